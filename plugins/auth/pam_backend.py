"""Checking passwords with PAM (``--server-auth pam:``), through python-pam.

The relay asks PAM service ``[auth] pam_service`` (default ``relay``; ``pam:SERVICE`` names
another) to authenticate the user and then to check the account (expired or locked accounts
fail). Only PLAIN and LOGIN can be offered: PAM needs the password itself, which CRAM-MD5 never
sends. A PAM conversation blocks (and a failing ``pam_unix`` may sleep), so the plugin runs it in
a worker thread.

``/etc/pam.d/relay`` for the system's accounts could read::

    auth    required pam_unix.so nodelay
    account required pam_unix.so

``nodelay`` leaves the delay after a failure to the relay's own throttle. The relay must be able
to read ``/etc/shadow`` for pam_unix to check other users' passwords (run it as root, or in the
``shadow`` group).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from mailrelay.config.loader import ConfigError

from .backend import Outcome

log = logging.getLogger("mailrelay.auth")

# PAM results that say nothing about the credentials: the client may try again later (454).
_TEMPORARY = {"PAM_OPEN_ERR", "PAM_SYMBOL_ERR", "PAM_SERVICE_ERR", "PAM_SYSTEM_ERR", "PAM_BUF_ERR",
              "PAM_AUTHINFO_UNAVAIL", "PAM_CONV_ERR", "PAM_TRY_AGAIN", "PAM_ABORT", "PAM_MODULE_UNKNOWN",
              "PAM_BAD_ITEM"}


def _pam_module() -> Any:
    try:
        import pam
    except (ImportError, OSError) as e:  # OSError: python-pam present, libpam missing
        raise ConfigError(f"--server-auth pam: needs python-pam and libpam ({e})") from None
    return pam


class PamBackend:
    """Accounts from PAM; no trusted addresses (there is no secrets file to list them)."""

    def __init__(self, service: str) -> None:
        self.service = service
        self._pam = _pam_module()
        self._temporary = {getattr(self._pam, name) for name in _TEMPORARY if hasattr(self._pam, name)}
        self._user_unknown = getattr(self._pam, "PAM_USER_UNKNOWN", 10)
        if not os.path.exists(f"/etc/pam.d/{service}"):
            log.warning("PAM service %r has no /etc/pam.d/%s: PAM falls back to 'other' (often slow to "
                        "fail, or refusing everyone)", service, service)

    def mechanisms(self, secure: bool) -> list[str]:
        return ["PLAIN", "LOGIN"]

    def trusted(self, peer_ip: str) -> str | None:
        return None

    def refresh(self) -> None:
        """Nothing to re-read: PAM reads its own configuration on every conversation."""

    def check(self, mechanism: str, username: str, password: str | None, challenge: str | None,
              response: str | None) -> Outcome:
        if mechanism not in ("PLAIN", "LOGIN"):
            return Outcome(False, f"PAM cannot check {mechanism}")
        if not password or "\0" in password or "\0" in username:
            return Outcome(False, "empty or malformed password")
        conversation = self._pam.pam()  # one per call: an instance is not thread-safe
        # resetcreds=False: this is a password check, not a login; no credentials to establish.
        if conversation.authenticate(username, password, service=self.service, resetcreds=False):
            return Outcome(True)
        code, reason = conversation.code, str(conversation.reason)
        if code in self._temporary:
            return Outcome(False, f"PAM: {reason}", temporary=True)
        return Outcome(False, "unknown user" if code == self._user_unknown else f"PAM: {reason}")
