"""HTTP endpoints, one module per concern; `server.app` holds the routing table."""
