"""Remote access: sessions that map a public port to a device's port for a while."""
