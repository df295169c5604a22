"""SMTP AUTH (RFC 4954) on aiosmtpd's exchange, with every credential decision made by plugins.

aiosmtpd runs the SASL exchanges (the 334 challenges, base64, ``*`` to cancel) and would check
the credentials synchronously; here its check only hands the credentials back, and the
``on_auth`` hook decides, awaited (PAM runs in a thread). What is offered to a session comes from
the ``auth_mechanisms`` hook: nothing when no plugin answers, so AUTH exists only when an
authentication plugin is enabled. CRAM-MD5 (RFC 2195) is ours: aiosmtpd has no such mechanism.
"""

from __future__ import annotations

import base64
import logging
import os
import time
import warnings
from typing import TYPE_CHECKING, Any

from aiosmtpd.smtp import MISSING, SMTP, AuthResult, LoginPassword

from ..types import Action

if TYPE_CHECKING:  # pragma: no cover
    from .protocol import RelaySMTP

log = logging.getLogger("mailrelay.smtp")

AUTH_MECHANISMS = ("PLAIN", "LOGIN", "CRAM-MD5")

# aiosmtpd sets its own deprecated Session.login_data after every AUTH; nothing here reads it.
warnings.filterwarnings("ignore", message="Session.login_data is deprecated")


class SmtpAuth:
    """Mixed into :class:`~mailrelay.smtp.protocol.RelaySMTP`."""

    async def offered_mechanisms(self: RelaySMTP) -> list[str]:
        """The mechanisms this session may use now (asked of the plugins at each EHLO and AUTH)."""
        session = self.relay_session
        if session is None or not self.reception.hooks.has("auth_mechanisms"):
            return []
        offered = await self.reception.auth_mechanisms(session)
        return [m for m in (x.upper() for x in offered) if m in AUTH_MECHANISMS]

    async def smtp_AUTH(self: RelaySMTP, arg: str | None) -> None:
        if await self._need_helo():
            return
        if self.transaction is not None:
            await self.push("503 5.5.1 AUTH is not permitted during a mail transaction")
            return
        mechanism = (arg or "").split(" ", 1)[0].upper()
        offered = await self.offered_mechanisms()
        if mechanism and mechanism not in offered:
            if not offered:
                await self.push("502 5.5.1 AUTH is not available here")
            else:
                await self.push("504 5.5.4 Unrecognized authentication type")
            return
        await SMTP.smtp_AUTH(self, arg)

    def _authenticate(self: RelaySMTP, mechanism: str, auth_data: Any) -> AuthResult:
        # Called synchronously by aiosmtpd's PLAIN and LOGIN: pass the credentials back to our
        # async auth_* methods instead of deciding here.
        return AuthResult(success=False, handled=False, auth_data=auth_data)

    async def auth_PLAIN(self: RelaySMTP, _: Any, args: list[str]) -> AuthResult:
        # RFC 4616: authzid NUL authcid NUL password. aiosmtpd drops the authzid; acting as
        # another user is not something this relay grants, so one that differs is refused.
        if len(args) == 1:
            blob = await self.challenge_auth("")
            if blob is MISSING:
                return AuthResult(success=False, handled=True)
        else:
            try:
                blob = base64.b64decode(args[1], validate=True)
            except ValueError:
                await self.push("501 5.5.2 Can't decode base64")
                return AuthResult(success=False, handled=True)
        assert isinstance(blob, bytes)
        parts = blob.split(b"\0")
        if len(parts) != 3:
            await self.push("501 5.5.2 Malformed PLAIN response")
            return AuthResult(success=False, handled=True)
        authzid, login, password = parts
        if authzid and authzid != login:
            return AuthResult(success=False, handled=False,
                              message="535 5.7.8 Authorization identity differs from the user name")
        return await self._check_password("PLAIN", AuthResult(success=False, handled=False,
                                                              auth_data=LoginPassword(login, password)))

    async def auth_LOGIN(self: RelaySMTP, _: Any, args: list[str]) -> AuthResult:
        return await self._check_password("LOGIN", await SMTP.auth_LOGIN(self, _, args))

    async def auth_CRAM__MD5(self: RelaySMTP, _: Any, args: list[str]) -> AuthResult:
        if len(args) > 1:
            await self.push("501 5.5.4 CRAM-MD5 takes no initial response")
            return AuthResult(success=False, handled=True)
        challenge = f"<{os.getpid()}.{time.time_ns()}.{os.urandom(6).hex()}@{self.hostname}>"
        answer = await self.challenge_auth(challenge)
        if answer is MISSING:
            return AuthResult(success=False, handled=True)  # cancelled or bad base64: answered
        assert isinstance(answer, bytes)
        username, _, digest = answer.decode("utf-8", "replace").rpartition(" ")
        if not username or len(digest) != 32:
            await self.push("501 5.5.2 Malformed CRAM-MD5 response")
            return AuthResult(success=False, handled=True)
        return await self._decide("CRAM-MD5", username, None, challenge, digest.lower())

    async def _check_password(self: RelaySMTP, mechanism: str, result: AuthResult) -> AuthResult:
        data = result.auth_data
        if not isinstance(data, LoginPassword):
            return result  # aiosmtpd already answered (cancelled, bad base64)
        try:
            username, password = data.login.decode("utf-8"), data.password.decode("utf-8")
        except UnicodeDecodeError:
            await self.push("501 5.5.2 Credentials are not UTF-8")
            return AuthResult(success=False, handled=True)
        return await self._decide(mechanism, username, password, None, None)

    async def _decide(self: RelaySMTP, mechanism: str, username: str, password: str | None,
                      challenge: str | None, response: str | None) -> AuthResult:
        session = self.relay_session
        assert session is not None
        verdict = await self.reception.auth(session, mechanism, username, password, challenge, response)
        if verdict.action is Action.OK:
            session.auth_user, session.auth_mechanism = username, mechanism
            return AuthResult(success=True, handled=False, auth_data=username,
                              message=f"235 {verdict.enhanced or '2.7.0'} {verdict.text or 'Authentication successful'}")
        if verdict.action is Action.DISCONNECT:
            await self.push(f"{verdict.code or 421} {verdict.enhanced or '4.7.0'} {verdict.text}")
            self._close()
            return AuthResult(success=False, handled=True)
        if verdict.action is Action.DENYSOFT:
            return AuthResult(success=False, handled=False, message=f"{verdict.code or 454} {verdict.enhanced or '4.7.0'} "
                                                     f"{verdict.text or 'Temporary authentication failure'}")
        if verdict.action is Action.DENY:
            return AuthResult(success=False, handled=False, message=f"{verdict.code or 535} {verdict.enhanced or '5.7.8'} "
                                                     f"{verdict.text or 'Authentication credentials invalid'}")
        return AuthResult(success=False, handled=False)  # nobody vouched for the credentials: 535
