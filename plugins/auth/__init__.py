"""The ``auth`` plugin: SMTP AUTH credentials (E-MailRelay secrets files, password hashes, PAM),
trusted client addresses, throttling of failed attempts, and ``relay passwd``. See ``plugin.py``."""
