"""SMTP servers for the relay to forward to: an aiosmtpd sink that can refuse recipients, drop the
connection in DATA or stall, and Postfix's smtp-sink as a peer nobody here wrote."""

from __future__ import annotations

import asyncio
import email
import email.policy
import hmac
import threading
import time
from dataclasses import dataclass, field

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult


@dataclass
class Received:
    sender: str
    recipients: list[str]
    content: bytes
    options: list[str]

    @property
    def message(self) -> email.message.EmailMessage:
        return email.message_from_bytes(self.content, policy=email.policy.default)  # type: ignore[return-value]


@dataclass
class Behaviour:
    """What the sink does; change it while the test runs."""

    refuse: dict[str, str] = field(default_factory=dict)  # recipient substring -> reply ("550 5.1.1 ...")
    drop_in_data: bool = False                            # close the connection instead of answering DATA
    stall_in_data: float = 0.0                            # seconds to wait before answering DATA
    smtputf8: bool = True
    pipelining: bool = False                              # advertise PIPELINING (aiosmtpd reads commands in order anyway)
    eightbitmime: bool = True                             # False: a 7-bit-only server (no 8BITMIME in EHLO)


class SinkHandler:
    def __init__(self, behaviour: Behaviour):
        self.behaviour = behaviour
        self.received: list[Received] = []
        self.connections = 0
        self.lock = threading.Lock()

    async def auth_CRAM__MD5(self, server, args):
        """RFC 2195 CRAM-MD5 (aiosmtpd has no built-in one)."""
        challenge = f"<{time.time_ns()}@sink.test>".encode()
        response = await server.challenge_auth(challenge)
        name, _, digest = response.decode().partition(" ")
        name_ok, password = self.cram_account
        expected = hmac.new(password.encode(), challenge, "md5").hexdigest()
        ok = name == name_ok and hmac.compare_digest(digest, expected)
        if ok:
            self.logins.append(name)
        return AuthResult(success=ok, handled=False)

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        if self.behaviour.pipelining:
            responses.insert(1, "250-PIPELINING")
        return responses

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        for needle, reply in self.behaviour.refuse.items():
            if needle in address:
                return reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):
        if self.behaviour.stall_in_data:
            await asyncio.sleep(self.behaviour.stall_in_data)
        if self.behaviour.drop_in_data:
            server.transport.close()
            return "421 4.3.0 dropping"  # never arrives: the connection is gone
        with self.lock:
            sender = "" if envelope.mail_from in ("<>", None) else envelope.mail_from  # aiosmtpd keeps "<>"
            self.received.append(Received(sender, list(envelope.rcpt_tos),
                                          envelope.original_content, list(envelope.mail_options)))
        return "250 2.0.0 stored"


class CountingSMTP(SMTP):
    def connection_made(self, transport):
        self.event_handler.connections += 1
        super().connection_made(transport)


class Sink:
    """An aiosmtpd server on 127.0.0.1 in a thread; with ``tls_context`` it offers STARTTLS, with
    ``account`` (name, password) it offers AUTH PLAIN/LOGIN after STARTTLS and requires it."""

    def __init__(self, port: int, behaviour: Behaviour | None = None, *, tls_context=None,
                 account: tuple[str, str] | None = None):
        self.behaviour = behaviour or Behaviour()
        self.handler = SinkHandler(self.behaviour)
        self.port = port
        self.logins: list[str] = []
        kwargs: dict = {}
        if tls_context is not None:
            kwargs.update(tls_context=tls_context, require_starttls=True, server_hostname="localhost")
        if account is not None:
            self.handler.cram_account = account
            self.handler.logins = self.logins

            def authenticator(server, session, envelope, mechanism, auth_data):
                ok = (auth_data.login.decode(), auth_data.password.decode()) == account
                if ok:
                    self.logins.append(auth_data.login.decode())
                return AuthResult(success=ok, handled=False)  # handled=False: aiosmtpd sends the 535
            kwargs.update(authenticator=authenticator, auth_required=True, auth_require_tls=True)
        if not self.behaviour.eightbitmime:
            kwargs["decode_data"] = True  # aiosmtpd then leaves 8BITMIME out of its EHLO reply
        self.controller = _Controller(self.handler, hostname="127.0.0.1", port=port,
                                      enable_SMTPUTF8=self.behaviour.smtputf8, ready_timeout=10, **kwargs)

    def start(self) -> "Sink":
        self.controller.start()
        return self

    def stop(self) -> None:
        self.controller.stop()

    @property
    def received(self) -> list[Received]:
        with self.handler.lock:
            return list(self.handler.received)

    def wait_for(self, count: int, timeout: float = 15.0) -> list[Received]:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            got = self.received
            if len(got) >= count:
                return got
            time.sleep(0.02)
        raise AssertionError(f"sink got {len(self.received)} message(s), expected {count}")


class _Controller(Controller):
    def factory(self):
        return CountingSMTP(self.handler, **self.SMTP_kwargs)
