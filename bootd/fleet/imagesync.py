"""Image versions in cluster mode: etcd holds what the cluster knows, each member a copy.

Theory of operation
-------------------

bootd/state/cluster.py rule 9 says where things are: `images/NAME/versions/V` records a
version (its files' sha256 and sizes, command line, who added it, when it was pruned),
`images/NAME/pointers` its promoted version, rollback history and rollout pointers.
This module is the shell over that mirror and over this member's image store.

Rules:

1. Reading is from the mirror (`catalog`, `records`, `pointers`): no request waits on
   etcd. A record that does not decode, or whose version does not name its content, is
   left out with one warning per revision.
2. Every change is a compare-and-swap on the keys it reads (`EtcdCluster.cas`), retried
   a few times on a lost race with the pointer arithmetic of bootd/fleet/imagestore.py
   applied again to what won, so `promote`, `rollback`, a rollout's pool pointer and
   `prune` keep the single-instance rules whichever member runs them. A record changed,
   here or by another member, is heard the same way (`_heard`): the sync loop wakes and
   the runtime snapshot is rebuilt (`on_change`).
3. `promote` (and a rollout, bootd/power/rollouts.py) is refused for a version some live
   member does not hold yet: every member must be able to serve what new boots get.
4. The sync loop (`run`) brings the store to the cluster's view (`sync_plan`): it
   publishes versions added here (`bootd image add`, or a copy made before cluster
   mode), deletes copies of pruned versions, and fetches the others over HTTP from a
   member that holds them (`/images/NAME/V/PART`, the URLs nodes use), each file hashed
   while written and committed only if it matches the record (ImageStore.commit). A
   failed fetch waits (doubling, up to BACKOFF_MAX) before that version is tried again.
   After each change the runtime snapshot is rebuilt, then the member says which
   versions it holds (so that what it says it holds, it serves). A store from before
   cluster mode is published with its promoted version first, and its pointers.json
   becomes the cluster's pointers when the cluster has none.
5. `prune` marks records pruned (a tombstone) instead of deleting them, so a member that
   was down meanwhile deletes its copy when it comes back instead of publishing it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import structlog
from prometheus_client import Counter

from bootd.fleet.images import PARTS
from bootd.fleet.imagestore import (
    ImageStore,
    ImageStoreError,
    Pointers,
    SharedCatalog,
    VersionInfo,
    prunable,
)
from bootd.state.cluster import (
    IMAGES,
    BadRecord,
    Fetch,
    VersionRecord,
    decode_pointers,
    decode_version,
    encode_pointers,
    encode_version,
    image_key_of,
    image_pointers_key,
    image_version_key,
    member_of,
    sync_plan,
)
from bootd.state.etcd import EtcdCluster, NotRegistered

log = structlog.get_logger("bootd.images")

FETCHES = Counter("bootd_image_fetches", "Image versions fetched from another member, by "
                  "outcome (ok, failed: one source's attempt)", ["outcome"])
FETCHED_BYTES = Counter("bootd_image_fetched_bytes", "Bytes of image versions fetched from "
                        "other members")

SYNC_INTERVAL = 5.0  # seconds between store scans when nothing wakes the loop
BACKOFF_MIN, BACKOFF_MAX = 1.0, 300.0
ATTEMPTS = 5  # compare-and-swap rounds before a change gives up (rule 2)
CHUNK = 1 << 20
STRANDED_AFTER = 30.0  # seconds a version may have no holder before it is warned of


class SharedImages:
    def __init__(self, cluster: EtcdCluster, store: ImageStore, *,
                 on_change: Callable[[], None] = lambda: None,
                 on_local_change: Callable[[], None] = lambda: None,
                 clock: Callable[[], float] = time.time) -> None:
        """`on_change`: the images a snapshot would serve changed (a pointer, a record);
        `on_local_change`: the copies in this member's store did (one fetched, added or
        deleted), called before the other members are told, so that what they are told
        this member holds, it serves."""
        self.cluster, self.store = cluster, store
        self.on_change, self.on_local_change, self.clock = on_change, on_local_change, clock
        self._bad: set[tuple[bytes, int]] = set()
        self._backoff: dict[tuple[str, str], tuple[float, float]] = {}  # at, delay
        self._stranded: dict[tuple[str, str], float] = {}  # since (monotonic)
        self._warned: set[tuple[str, str]] = set()
        self._wake = asyncio.Event()
        self._held: dict[str, dict[str, float]] = {}
        cluster.on_shared_change(self._heard)

    def _heard(self, key: bytes) -> None:
        if image_key_of(self.cluster.prefix, key) is not None:
            self._wake.set()
            self.on_change()
        elif member_of(self.cluster.prefix, key) is not None:
            self._wake.set()  # a member may hold now what this one waits for

    # ------------------------------------------------------------------ reading (rule 1)

    def records(self) -> dict[str, dict[str, VersionRecord]]:
        """Every version record, pruned ones included."""
        out: dict[str, dict[str, VersionRecord]] = {}
        prefix = self.cluster.prefix
        for key, value, revision in self.cluster.shared_items(IMAGES):
            found = image_key_of(prefix, key)
            if found is None or found[1] is None:
                continue
            name, version = found[0], found[1]
            try:
                out.setdefault(name, {})[version] = decode_version(name, version, value)
            except BadRecord as exc:
                self._warn_bad(key, revision, exc)
        return out

    def pointers(self, name: str) -> Pointers:
        key = image_pointers_key(self.cluster.prefix, name)
        found = self.cluster.shared(key)
        if found is None:
            return Pointers()
        try:
            return decode_pointers(name, found[0])
        except BadRecord as exc:
            self._warn_bad(key, found[1], exc)
            return Pointers()

    def live_versions(self, name: str) -> dict[str, VersionInfo]:
        """An image's versions that are not pruned, oldest first."""
        found = [r.info for r in self.records().get(name, {}).values() if r.pruned is None]
        return {i.version: i for i in sorted(found, key=lambda i: (i.added, i.version))}

    def catalog(self) -> SharedCatalog:
        records = self.records()
        pointers = {name: self.pointers(name) for name in records}
        return SharedCatalog(pointers, {
            name: {v: r.info for v, r in versions.items() if r.pruned is None}
            for name, versions in records.items()})

    def missing_on(self, name: str, version: str) -> list[str]:
        """The live members that do not hold NAME@VERSION (rule 3)."""
        holders = set(self.cluster.holders(name, version))
        return [m for m in self.cluster.membership().members if m not in holders]

    def _warn_bad(self, key: bytes, revision: int, exc: Exception) -> None:
        if (key, revision) not in self._bad:
            self._bad.add((key, revision))
            log.warning("cluster: image record unreadable: left out",
                        key=key.decode(errors="replace"), error=str(exc))

    # ------------------------------------------------------------------ changes (rule 2)

    async def update_pointers(self, name: str,
                              change: Callable[[Pointers, dict[str, VersionInfo]], Pointers],
                              ) -> Pointers:
        """Apply `change` (which may raise ImageStoreError) to the image's pointers."""
        key = image_pointers_key(self.cluster.prefix, name)
        for _ in range(ATTEMPTS):
            before = self.pointers(name)
            after = change(before, self.live_versions(name))
            if after == before:
                return after
            if await self.cluster.cas({key: encode_pointers(after)}):
                return after  # heard as a changed record (`_heard`), like any other
        raise ImageStoreError(f"the pointers of {name} kept changing under this request; "
                              "try again")

    def require_everywhere(self, name: str, version: str) -> None:
        """Rule 3, as the operator's error."""
        if version not in self.live_versions(name):
            raise ImageStoreError(f"image {name} has no version {version} in the cluster")
        missing = self.missing_on(name, version)
        if missing:
            raise ImageStoreError(f"{name}@{version} is not on {', '.join(missing)} yet "
                                  "(members fetch new versions within seconds; `bootd "
                                  "image list` shows who holds it)")

    async def promote(self, name: str, version: str) -> Pointers:
        self.require_everywhere(name, version)
        return await self.update_pointers(name, lambda ptr, _: ptr.promote(version))

    async def rollback(self, name: str) -> Pointers:
        return await self.update_pointers(
            name, lambda ptr, known: ptr.rollback(set(known), name))

    async def prune(self, name: str, keep: int, in_use: set[str]) -> list[str]:
        """Rule 5: tombstones for what `prunable` allows, in one transaction that also
        checks the pointers did not move meanwhile."""
        pointers_key = image_pointers_key(self.cluster.prefix, name)
        for _ in range(ATTEMPTS):
            records = self.records().get(name, {})
            doomed = prunable(list(self.live_versions(name).values()), self.pointers(name),
                              in_use, keep)
            if not doomed:
                return []
            now = self.clock()
            writes: dict[bytes, bytes | None] = {
                image_version_key(self.cluster.prefix, name, v): encode_version(
                    VersionRecord(records[v].info, records[v].by, now)) for v in doomed}
            found = self.cluster.shared(pointers_key)
            if await self.cluster.cas(writes, expect={
                    pointers_key: found[1] if found is not None else 0}):
                return doomed
        raise ImageStoreError(f"the versions of {name} kept changing under this request; "
                              "try again")

    async def publish(self, name: str, version: str) -> bool:
        """Make a version of this member's store known to the cluster (rule 4); the
        image's first version is promoted (single-instance rule 2). True if it was."""
        info = self.store.info(name, version)
        if info is None or version not in self.store.complete().get(name, {}):
            raise ImageStoreError(f"{name}@{version} is not complete in {self.store.root}")
        version_key = image_version_key(self.cluster.prefix, name, version)
        pointers_key = image_pointers_key(self.cluster.prefix, name)
        record = encode_version(VersionRecord(info, self.cluster.me))
        for _ in range(ATTEMPTS):
            known = self.records().get(name, {}).get(version)
            if known is not None and known.pruned is None:
                return False  # already published (by another member, or before)
            ptr = self.pointers(name)
            writes: dict[bytes, bytes | None] = {version_key: record}
            promoted = ptr.promoted is None
            if promoted:
                # a store from before cluster mode: its pointers.json, if it names this
                # version, is what the fleet booted; else the first version is promoted
                seed = self.store.pointers(name)
                writes[pointers_key] = encode_pointers(
                    seed if seed.promoted == version else ptr.promote(version))
            if await self.cluster.cas(writes):
                log.info("cluster: image version published", image=name, version=version,
                         promoted=promoted)
                return promoted
        raise ImageStoreError(f"{name}@{version}: the cluster's records kept changing; "
                              "try again")

    # ------------------------------------------------------------------ sync (rule 4)

    async def run(self) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(
                total=None, connect=5, sock_read=30)) as http:
            while True:
                self._wake.clear()
                try:
                    await self.sync_once(http)
                except NotRegistered:
                    pass  # the session comes back; the next round tries again
                except Exception as exc:  # a disk, a peer, etcd (an election, a timeout)
                    log.warning("cluster: image sync failed; trying again",
                                error=str(exc) or type(exc).__name__)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), SYNC_INTERVAL)

    def _local(self) -> dict[str, dict[str, float]]:
        return {name: {v: info.added for v, info in infos.items()}
                for name, infos in self.store.complete().items()}

    async def _advertise(self, local: Mapping[str, Mapping[str, float]]) -> None:
        if local != self._held:
            self.on_local_change()
            self._held = {n: dict(v) for n, v in local.items()}
        await self.cluster.advertise_versions(
            {name: sorted(versions) for name, versions in local.items() if versions})

    async def sync_once(self, http: aiohttp.ClientSession) -> None:
        if not self.cluster.membership().registered:
            return
        local = await asyncio.to_thread(self._local)
        records = self.records()
        holders = {(name, version): self.cluster.holders(name, version)
                   for name, versions in records.items() for version in versions}
        plan = sync_plan(self.cluster.me, local, records, holders)
        # a store's own promoted version first (see publish)
        for name, version in sorted(plan.publish, key=lambda item: (
                self.store.pointers(item[0]).promoted != item[1], item)):
            await self.publish(name, version)
        for name, version in plan.delete:
            if await asyncio.to_thread(self.store.remove, name, version):
                log.info("cluster: pruned image version deleted here", image=name,
                         version=version)
            local.get(name, {}).pop(version, None)
        await self._advertise(local)
        now = time.monotonic()
        # a version is published before its adder says it holds it: only a lasting
        # absence is worth a warning, once
        self._stranded = {s: self._stranded.get(s, now) for s in plan.stranded}
        self._warned &= set(self._stranded)
        for (name, version), since in self._stranded.items():
            if now - since >= STRANDED_AFTER and (name, version) not in self._warned:
                self._warned.add((name, version))
                log.warning("cluster: no live member holds an image version: it cannot "
                            "be fetched until one does", image=name, version=version)
        for fetch in plan.fetch:
            at, delay = self._backoff.get((fetch.name, fetch.version), (0.0, 0.0))
            if now < at:
                continue
            record = records[fetch.name][fetch.version]
            if await self._fetch(http, fetch, record.info):
                self._backoff.pop((fetch.name, fetch.version), None)
                local.setdefault(fetch.name, {})[fetch.version] = record.info.added
                await self._advertise(local)
            else:
                delay = min(BACKOFF_MAX, max(BACKOFF_MIN, delay * 2))
                self._backoff[(fetch.name, fetch.version)] = (time.monotonic() + delay,
                                                             delay)

    async def _fetch(self, http: aiohttp.ClientSession, fetch: Fetch,
                     info: VersionInfo) -> bool:
        """One version from the first source that serves it whole (rule 4)."""
        ref = f"{fetch.name}@{fetch.version}"
        for source in fetch.sources:
            member = self.cluster.member(source)
            url = member.url if member is not None else None
            if url is None:
                continue
            started = time.monotonic()
            try:
                with self.store.incoming(fetch.name) as incoming:
                    for part in PARTS:
                        if part in info.digests:
                            await _download(http, f"{url}/images/{fetch.name}/"
                                            f"{fetch.version}/{part}", incoming / part)
                    added = await asyncio.to_thread(self.store.commit, info, incoming, False,
                                                    {p: f"member {source}"
                                                     for p in info.digests})
            except (OSError, TimeoutError, aiohttp.ClientError, ImageStoreError) as exc:
                FETCHES.labels("failed").inc()
                log.warning("cluster: image fetch failed", image=ref, source=source,
                            error=str(exc) or type(exc).__name__)
                continue
            FETCHES.labels("ok").inc()
            FETCHED_BYTES.inc(sum(info.sizes.values()))
            log.info("cluster: image version fetched", image=ref, source=source,
                     bytes=sum(info.sizes.values()), new=added.new,
                     seconds=round(time.monotonic() - started, 2))
            return True
        return False

    # ------------------------------------------------------------------ the operator's view

    def listing(self, name: str | None, running: Mapping[str, int]) -> list[dict[str, Any]]:
        """`bootd image list` in cluster mode: every live version, who holds it."""
        doc = []
        records = self.records()
        for image in [name] if name else sorted(records):
            ptr = self.pointers(image)
            for version, info in self.live_versions(image).items():
                record = records[image][version]
                doc.append({
                    "image": image, "version": version, "added": info.added,
                    "size": sum(info.sizes.values()), "promoted": version == ptr.promoted,
                    "pools": sorted(p for p, v in ptr.pools.items() if v == version),
                    "nodes": running.get(f"{image}@{version}", 0),
                    "sha256": dict(info.digests), "cmdline": info.cmdline,
                    "by": record.by, "held_by": sorted(self.cluster.holders(image, version)),
                    "missing_on": self.missing_on(image, version)})
        return doc


async def _download(http: aiohttp.ClientSession, url: str, path: Path) -> None:
    """Stream one file to `path` (ImageStore.commit checks it against the record)."""
    async with http.get(url) as response:
        if response.status != 200:
            raise ImageStoreError(f"GET {url}: HTTP {response.status}")
        with path.open("wb") as out:
            async for chunk in response.content.iter_chunked(CHUNK):
                out.write(chunk)
