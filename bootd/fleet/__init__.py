"""The fleet model: the validated config, resolved node profiles, the node directory,
images, join tokens, the boot file tree and everything rendered for a node."""
