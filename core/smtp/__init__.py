"""The SMTP front end: the only part of the code base that knows aiosmtpd exists."""
