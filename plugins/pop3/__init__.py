"""``pop3``: the POP3 server plugin (RFC 1939, 2449, 5034, 2595) over the relay's mailboxes."""
