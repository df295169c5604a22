"""The C side of ``so:`` filters: the cffi binding of ``filters_c/mailrelay_filter.h`` and the
worker process that runs a compiled filter away from the daemon.

Run as ``python -m mailrelay_plugins.filters.so_worker``; it speaks length-prefixed frames on its
standard input and output (each frame an 8-byte big-endian length and that many bytes):

* hello: the daemon sends ``{"path", "argument", "max_output"}`` (JSON); the worker loads the
  library, checks its ABI version, calls ``mailrelay_filter_init`` and answers ``{"ok": true,
  "pid": ...}`` or ``{"ok": false, "error": ...}`` (and exits).
* then per message: a JSON frame with the envelope fields (:data:`MESSAGE_FIELDS`, ``recipients``
  a list) and a frame with the content; the worker answers with a JSON frame (:class:`Answer`
  without the content) and a content frame (empty when ``has_content`` is false).
* end of input: ``mailrelay_filter_cleanup`` and exit 0.

The daemon uses the same hello with no message as its start-up check. This module imports
nothing from the daemon, so that a worker starts quickly.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import sys
from dataclasses import asdict, dataclass
from typing import IO, Any

import cffi

ABI_VERSIONS = frozenset({1})   # what this relay speaks (MAILRELAY_FILTER_ABI_VERSION)
TEXT_SIZE = 512                 # MAILRELAY_FILTER_TEXT_SIZE
ERROR_SIZE = 512                # MAILRELAY_FILTER_ERROR_SIZE
FRAME = struct.Struct("!Q")
MAX_HEADER_FRAME = 16 << 20     # JSON frames: envelopes with many recipients, never megabytes of text
MAX_CONTENT_FRAME = 1 << 40     # the daemon's size limit applies before a message gets here
MESSAGE_FIELDS = ("spool_id", "stage", "sender", "client_ip", "helo", "auth_user", "message_id",
                  "content_path", "envelope_path")

# Must match filters_c/mailrelay_filter.h (the test suite compares the layouts with a C compiler).
CDEF = """
struct mailrelay_message {
    const char *spool_id;
    const char *stage;
    const char *sender;
    const char *const *recipients;
    size_t recipient_count;
    const char *client_ip;
    const char *helo;
    const char *auth_user;
    const char *message_id;
    const char *content_path;
    const char *envelope_path;
    const unsigned char *content;
    size_t content_size;
};
struct mailrelay_verdict {
    int exit_code;
    int smtp_code;
    char text[512];
    char reason[512];
    unsigned char *content;
    size_t content_size;
};
extern int mailrelay_filter_abi_version;   /* const in C; ABI mode reads it as a variable */
int mailrelay_filter_init(const char *argument, void **state, char *error, size_t error_size);
int mailrelay_filter(void *state, const struct mailrelay_message *message, struct mailrelay_verdict *verdict);
void mailrelay_filter_free(void *state, struct mailrelay_verdict *verdict);
void mailrelay_filter_cleanup(void *state);
"""

ffi = cffi.FFI()
ffi.cdef(CDEF)


class FilterLoadError(Exception):
    """The library cannot be used: missing, not loadable, wrong ABI, or its init refused."""


@dataclass(frozen=True)
class Answer:
    """One ``mailrelay_filter`` call as data. ``status`` is its return value (non-zero: the
    filter failed); ``error`` is set instead when the relay refused what it returned."""

    status: int = 0
    exit_code: int = 0
    smtp_code: int = 0
    text: str = ""
    reason: str = ""
    content: bytes | None = None
    error: str = ""


def _c_text(array: Any) -> str:
    return ffi.string(array).decode("utf-8", "replace")


class Library:
    """A loaded compiled filter: ``init`` once, ``call`` per message, ``cleanup`` at the end.

    Not thread-safe: the caller makes sure calls never overlap (the ABI promises that).
    """

    def __init__(self, path: str):
        self.path = path
        try:
            self.lib = ffi.dlopen(path, ffi.RTLD_NOW | ffi.RTLD_LOCAL)
        except OSError as e:
            raise FilterLoadError(f"cannot load {path}: {e}") from None
        try:
            version = int(self.lib.mailrelay_filter_abi_version)
        except (AttributeError, KeyError):  # cffi: KeyError for a variable, AttributeError for a function
            raise FilterLoadError(f"{path} is not a mailrelay filter: it does not export "
                                  "mailrelay_filter_abi_version (see filters_c/mailrelay_filter.h)") from None
        if version not in ABI_VERSIONS:
            raise FilterLoadError(f"{path} was built for filter ABI version {version}; this relay speaks "
                                  f"{', '.join(map(str, sorted(ABI_VERSIONS)))}: rebuild it against this "
                                  "relay's mailrelay_filter.h")
        self.version = version
        for name in ("mailrelay_filter_init", "mailrelay_filter", "mailrelay_filter_free"):
            try:
                getattr(self.lib, name)
            except (AttributeError, KeyError):
                raise FilterLoadError(f"{path} does not export {name}") from None
        try:
            self._cleanup = self.lib.mailrelay_filter_cleanup
        except (AttributeError, KeyError):
            self._cleanup = None
        self.state: Any = ffi.NULL
        self.initialised = False

    def init(self, argument: str) -> None:
        """Call ``mailrelay_filter_init``; its refusal (with its explanation) is a FilterLoadError."""
        state = ffi.new("void **")
        error = ffi.new("char[]", ERROR_SIZE)
        status = self.lib.mailrelay_filter_init(argument.encode("utf-8", "surrogateescape"), state, error,
                                                ERROR_SIZE)
        if status != 0:
            reason = _c_text(error) or f"mailrelay_filter_init returned {status}"
            raise FilterLoadError(f"{os.path.basename(self.path)} refused its argument: {reason}")
        self.state = state[0]
        self.initialised = True

    def call(self, fields: dict[str, Any], content: bytes, max_output: int) -> Answer:
        """Run ``mailrelay_filter`` on one message and copy out what it returned."""
        keep: list[Any] = []   # the C strings must outlive the call

        def c_string(value: Any) -> Any:
            data = ffi.new("char[]", str(value or "").encode("utf-8", "surrogateescape"))
            keep.append(data)
            return data

        message = ffi.new("struct mailrelay_message *")
        for name in MESSAGE_FIELDS:
            setattr(message, name, c_string(fields.get(name)))
        recipients = [c_string(r) for r in fields.get("recipients", ())]
        array = ffi.new("char *[]", [*recipients, ffi.NULL])
        message.recipients = array
        message.recipient_count = len(recipients)
        buffer = ffi.from_buffer(content)
        message.content = ffi.cast("const unsigned char *", buffer)
        message.content_size = len(content)
        verdict = ffi.new("struct mailrelay_verdict *")
        status = self.lib.mailrelay_filter(self.state, message, verdict)
        try:
            size = int(verdict.content_size)
            replacement: bytes | None = None
            error = ""
            if verdict.content != ffi.NULL:
                if size > max_output:
                    error = f"filter returned {size} bytes of content, more than the limit of {max_output}"
                else:
                    replacement = ffi.buffer(verdict.content, size)[:]
            return Answer(status, int(verdict.exit_code), int(verdict.smtp_code), _c_text(verdict.text),
                          _c_text(verdict.reason), replacement, error)
        finally:
            self.lib.mailrelay_filter_free(self.state, verdict)

    def cleanup(self) -> None:
        """``mailrelay_filter_cleanup``, once, if the library has one."""
        if self.initialised and self._cleanup is not None:
            self.initialised = False
            self._cleanup(self.state)


# ---------------------------------------------------------------- frames
def encode_frame(data: bytes) -> bytes:
    return FRAME.pack(len(data)) + data


def encode_json(value: Any) -> bytes:
    # surrogateescape'd envelope bytes survive as \udcXX escapes
    return encode_frame(json.dumps(value, separators=(",", ":")).encode())


def read_frame(stream: IO[bytes], limit: int) -> bytes | None:
    """One frame, or None at a clean end of input."""
    head = stream.read(FRAME.size)
    if not head:
        return None
    if len(head) != FRAME.size:
        raise EOFError("input ended inside a frame header")
    (size,) = FRAME.unpack(head)
    if size > limit:
        raise ValueError(f"frame of {size} bytes exceeds {limit}")
    data = stream.read(size)
    if len(data) != size:
        raise EOFError("input ended inside a frame")
    return data


# ---------------------------------------------------------------- the worker process
def _die_with_parent() -> None:
    """Linux: end the worker when the daemon dies, even while a filter call hangs."""
    parent = os.getppid()
    try:
        libc = cffi.FFI()
        libc.cdef("int prctl(int option, ...);")
        libc.dlopen(None).prctl(1, libc.cast("unsigned long", signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:
        os._exit(1)


def serve(requests: IO[bytes], answers: IO[bytes]) -> int:
    """The worker's life: hello, then one answer per message until the input ends."""
    hello = json.loads(read_frame(requests, MAX_HEADER_FRAME) or b"{}")
    try:
        library = Library(hello["path"])
        library.init(hello.get("argument", ""))
    except FilterLoadError as e:
        answers.write(encode_json({"ok": False, "error": str(e)}))
        answers.flush()
        return 2
    max_output = int(hello.get("max_output", 1 << 30))
    answers.write(encode_json({"ok": True, "pid": os.getpid(), "abi": library.version}))
    answers.flush()
    try:
        while (header := read_frame(requests, MAX_HEADER_FRAME)) is not None:
            fields = json.loads(header)
            content = read_frame(requests, MAX_CONTENT_FRAME)
            if content is None:
                raise EOFError("input ended before the content frame")
            answer = library.call(fields, content, max_output)
            head = {k: v for k, v in asdict(answer).items() if k != "content"}
            head["has_content"] = answer.content is not None
            answers.write(encode_json(head) + encode_frame(answer.content or b""))
            answers.flush()
    finally:
        library.cleanup()
    return 0


def main() -> int:
    # The protocol gets private copies of stdin/stdout; the filter's own printf() goes to stderr.
    requests = os.fdopen(os.dup(0), "rb")
    answers = os.fdopen(os.dup(1), "wb")
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the daemon decides when the worker stops
    _die_with_parent()
    try:
        return serve(requests, answers)
    except BrokenPipeError:
        return 0  # the daemon went away
    except (EOFError, ValueError) as e:
        print(f"mailrelay so: worker: bad request from the daemon: {e}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
