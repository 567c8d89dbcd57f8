"""Built-in sources. Each module is imported only when its scheme is first used."""
