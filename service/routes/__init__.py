"""HTTP routers: thin layers that parse wire models, call the core and shape responses."""
