"""The forwarding client pipelines (RFC 2920) when the next hop offers PIPELINING."""

from __future__ import annotations

import asyncio

import aiosmtplib

from mailrelay_plugins.forward.pipelining import encode_data, pipelined_transaction


class StrictPipeliningServer:
    """Answers nothing until it has MAIL, both RCPTs and DATA: a client that waits for each reply
    before the next command deadlocks here (and the test times out)."""

    def __init__(self):
        self.commands: list[bytes] = []
        self.data = b""

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 strict.test ESMTP\r\n")
        assert (await reader.readuntil(b"\r\n")).upper().startswith(b"EHLO")
        writer.write(b"250-strict.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n")
        group = []
        while len(group) < 4:
            group.append(await reader.readuntil(b"\r\n"))
        self.commands = group
        # replies in several small writes, as a real server's may arrive
        for reply in (b"250 2.1.0 sender ok\r\n", b"250 2.1.5 ok\r\n", b"550 5.1.1 no such user\r\n",
                      b"354 go ahead\r\n"):
            writer.write(reply)
            await writer.drain()
            await asyncio.sleep(0.01)
        self.data = await reader.readuntil(b"\r\n.\r\n")
        writer.write(b"250 2.0.0 queued\r\n")
        await reader.readuntil(b"\r\n")  # QUIT
        writer.write(b"221 bye\r\n")
        writer.close()


def test_mail_rcpt_and_data_go_out_before_any_reply():
    async def scenario():
        server_side = StrictPipeliningServer()
        server = await asyncio.start_server(server_side.handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, timeout=5)
        await client.connect()
        await client.ehlo()
        assert client.supports_extension("pipelining")
        replies = await asyncio.wait_for(pipelined_transaction(
            client, b"MAIL FROM:<a@example.test>", [b"RCPT TO:<ok@far.test>", b"RCPT TO:<nobody@far.test>"],
            b"Subject: x\r\n\r\n.leading dot\r\nbare\nLF\r\n", timeout=5), 10)
        # the connection is usable again with aiosmtplib's own commands afterwards
        await client.quit()
        server.close()
        return server_side, replies

    server_side, replies = asyncio.run(scenario())
    assert [c.split(b":")[0] for c in server_side.commands] == [b"MAIL FROM", b"RCPT TO", b"RCPT TO", b"DATA\r\n"]
    assert [r.code for r in replies.rcpts] == [250, 550]
    assert replies.data.code == 354 and replies.final.code == 250
    # dot-stuffed, and the bare LF became CRLF (no smuggling downstream)
    assert server_side.data == b"Subject: x\r\n\r\n..leading dot\r\nbare\r\nLF\r\n.\r\n"


def test_encode_data_terminates_and_stuffs():
    assert encode_data(b".\r\n") == b"..\r\n.\r\n"
    assert encode_data(b"no newline") == b"no newline\r\n.\r\n"
    assert encode_data(b"a\r.\rb") == b"a\r\n..\r\nb\r\n.\r\n"
