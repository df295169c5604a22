"""Forwarding plugins: smarthost and MX routing, the SMTP client."""
