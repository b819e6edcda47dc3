"""CMT memory service: the online path and the model components it loads."""
