"""Built-in plugins. Each registers through the ``mailrelay`` entry-point group, exactly like a
third-party plugin, and is enabled by name (``--plugins eventlog``)."""
