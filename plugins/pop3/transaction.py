"""The TRANSACTION-state commands of RFC 1939 (and TOP, UIDL), mixed into :class:`Pop3Session`.

Message numbers are those of the list taken at login. A message marked deleted is invisible to
every command (``-ERR``) until RSET; nothing leaves the mailbox before QUIT.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from .mailbox import CommitResult, Mailbox, StoredMessage
from .wire import CHUNK, WireReader, open_message

if TYPE_CHECKING:  # pragma: no cover
    from .protocol import Pop3Session

PULL = 4 * CHUNK  # octets read per worker-thread call while sending a message


class NoSuchMessage(Exception):
    """An argument that names no (undeleted) message; the text is the reply."""


class Transaction:
    """STAT, LIST, UIDL, RETR, TOP, DELE, NOOP, RSET."""

    mailbox: Mailbox | None

    def _message(self: Pop3Session, arg: str, command: str) -> tuple[int, StoredMessage]:  # type: ignore[misc]
        if not arg.isascii() or not arg.isdigit() or len(arg) > 10:
            raise NoSuchMessage(f"-ERR Syntax: {command} message-number")
        number = int(arg)
        assert self.mailbox is not None
        messages = self.mailbox.messages
        if not 1 <= number <= len(messages):
            raise NoSuchMessage(f"-ERR No such message ({len(messages)} in the mailbox)")
        message = messages[number - 1]
        if message.deleted:
            raise NoSuchMessage(f"-ERR Message {number} is deleted")
        return number, message

    def _present(self: Pop3Session) -> list[tuple[int, StoredMessage]]:  # type: ignore[misc]
        assert self.mailbox is not None
        return [(n, m) for n, m in enumerate(self.mailbox.messages, 1) if not m.deleted]

    async def cmd_STAT(self: Pop3Session, arg: str) -> None:  # type: ignore[misc]
        if arg:
            return await self.reply("-ERR Syntax: STAT")
        present = self._present()
        await self.reply(f"+OK {len(present)} {sum(m.size for _, m in present)}")

    async def cmd_LIST(self: Pop3Session, arg: str) -> None:  # type: ignore[misc]
        await self._listing(arg, "LIST", lambda m: str(m.size))

    async def cmd_UIDL(self: Pop3Session, arg: str) -> None:  # type: ignore[misc]
        await self._listing(arg, "UIDL", lambda m: m.uid)

    async def _listing(self: Pop3Session, arg: str, command: str,  # type: ignore[misc]
                       field: Callable[[StoredMessage], str]) -> None:
        if arg:
            try:
                number, message = self._message(arg, command)
            except NoSuchMessage as e:
                return await self.reply(str(e))
            return await self.reply(f"+OK {number} {field(message)}")
        present = self._present()
        lines = [f"+OK {len(present)} messages" + (f" ({sum(m.size for _, m in present)} octets)"
                                                   if command == "LIST" else "")]
        lines += [f"{n} {field(m)}" for n, m in present]
        lines.append(".")
        await self.send(("\r\n".join(lines) + "\r\n").encode("ascii"))

    async def cmd_RETR(self: Pop3Session, arg: str) -> None:  # type: ignore[misc]
        try:
            number, message = self._message(arg, "RETR")
        except NoSuchMessage as e:
            return await self.reply(str(e))
        if await self._send_message(message, f"+OK {message.size} octets", None):
            message.retrieved = True
            self.retrieved += 1

    async def cmd_TOP(self: Pop3Session, arg: str) -> None:  # type: ignore[misc]
        which, _, lines = arg.partition(" ")
        lines = lines.strip()
        if not lines.isascii() or not lines.isdigit() or len(lines) > 10:
            return await self.reply("-ERR Syntax: TOP message-number lines")
        try:
            number, message = self._message(which, "TOP")
        except NoSuchMessage as e:
            return await self.reply(str(e))
        await self._send_message(message, "+OK Top of message follows", int(lines))

    async def _send_message(self: Pop3Session, message: StoredMessage, status: str,  # type: ignore[misc]
                            body_lines: int | None) -> bool:
        """Stream one message: the status line, the stuffed content, the final dot."""
        assert self.mailbox is not None
        mailbox = self.mailbox

        def open_and_pull() -> tuple[WireReader, bytes, bool]:  # one thread hop for most messages
            reader = WireReader(open_message(mailbox.content_path(message)), body_lines)
            try:
                return (reader, *_pull(reader))
            except BaseException:
                reader.close()
                raise

        try:
            reader, data, done = await self.blocking(open_and_pull, on_abandon=lambda r: r[0].close())
        except OSError as e:
            self.log("warning", f"cannot read message uid={message.uid}: {e}")
            await self.reply("-ERR [SYS/TEMP] The message cannot be read now (it may have been removed)")
            return False
        try:
            pending = status.encode("ascii") + b"\r\n" + data
            while not done:
                await self.send(pending, flush=False)
                pending, done = await self.blocking(_pull, reader)
            await self.send(pending + b".\r\n")
        except OSError as e:  # read error half way: the response cannot be completed
            self.log("error", f"reading message uid={message.uid} failed half way: {e}")
            self.abort()
            return False
        finally:
            self.after_blocking(reader.close)
        return True

    async def cmd_DELE(self: Pop3Session, arg: str) -> None:  # type: ignore[misc]
        try:
            number, message = self._message(arg, "DELE")
        except NoSuchMessage as e:
            return await self.reply(str(e))
        message.deleted = True
        await self.reply(f"+OK Message {number} deleted")

    async def cmd_RSET(self: Pop3Session, arg: str) -> None:  # type: ignore[misc]
        if arg:
            return await self.reply("-ERR Syntax: RSET")
        assert self.mailbox is not None
        for message in self.mailbox.messages:
            message.deleted = False
        present = self._present()
        await self.reply(f"+OK {len(present)} messages ({sum(m.size for _, m in present)} octets)")

    async def cmd_NOOP(self: Pop3Session, arg: str) -> None:  # type: ignore[misc]
        await self.reply("-ERR Syntax: NOOP" if arg else "+OK")

    async def update(self: Pop3Session) -> None:  # type: ignore[misc]
        """QUIT in TRANSACTION: the UPDATE state (RFC 1939 6), then the lock is released."""
        assert self.mailbox is not None
        mailbox, delete = self.mailbox, not self.server.settings.no_delete
        marked = sum(1 for m in mailbox.messages if m.deleted)
        self.committing = True

        def commit_and_unlock() -> CommitResult:  # one thread call: the lock is held until the files are done
            try:
                return mailbox.commit(delete=delete)
            finally:
                mailbox.close()

        try:
            result = await self.blocking(commit_and_unlock)
        except OSError as e:
            self.log("error", f"update failed: {e}")
            await self.reply("-ERR [SYS/TEMP] Some deleted messages were not removed")
            return
        finally:
            self.mailbox = None
        self.log("info", f"update deleted={result.deleted} marked={marked} retrieved={self.retrieved}"
                         f"{' (no_delete)' if not delete else ''} failed={len(result.failed)}")
        self.server.emit("pop3.update", session=self.id, client=self.peer_ip, user=self.user,
                         deleted=result.deleted, retrieved=self.retrieved, failed=len(result.failed))
        if result.failed:
            await self.reply(f"-ERR [SYS/TEMP] {len(result.failed)} deleted message(s) not removed "
                             "(being forwarded or unreadable); the rest are gone")
        else:
            await self.reply(f"+OK Bye ({result.deleted if delete else 0} messages deleted)")


def _pull(reader: WireReader) -> tuple[bytes, bool]:
    """Up to about :data:`PULL` octets of the response, and whether the message is complete."""
    parts: list[bytes] = []
    size = 0
    while size < PULL:
        data = reader.read()
        if not data:
            return b"".join(parts), True
        parts.append(data)
        size += len(data)
    return b"".join(parts), False

