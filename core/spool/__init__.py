"""The spool: E-MailRelay-compatible message store with durable group commit."""

from .committer import fsync_dir
from .envelope import Envelope, EnvelopeError, xtext_decode, xtext_encode
from .store import PendingMessage, Spool, SpoolError, is_valid_id

__all__ = ["Envelope", "EnvelopeError", "PendingMessage", "Spool", "SpoolError", "fsync_dir", "is_valid_id",
           "xtext_decode", "xtext_encode"]
