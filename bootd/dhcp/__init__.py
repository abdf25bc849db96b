"""DHCP responder: the sans-I/O codec and decision (`packet`, `options`, `bootfile`,
`decide`, `outcomes`), the service that owns one datagram's whole path (`service`), and a
thin asyncio transport that only moves bytes (`transport`)."""
