/*
 * mailrelay_filter.h: the C ABI of compiled mailrelay filters (the "so:" filter kind).
 *
 * A compiled filter is a shared library that the relay loads with cffi in ABI mode (no compile
 * step on the relay's side). Configure it as
 *
 *     --filter so:/usr/local/lib/mailrelay/libstamp.so;X-Checked: yes     (isolated worker, default)
 *     --filter so:inprocess:/usr/local/lib/mailrelay/libstamp.so;ARG      (loaded into the daemon)
 *
 * Everything after the first ';' is the argument string handed to mailrelay_filter_init(). A
 * comma separates filters in a --filter chain, so an argument cannot contain one.
 *
 * ------------------------------------------------------------------------------------------------
 * What a library exports (plain C symbols; in C++ the declarations below are extern "C")
 *
 *   mailrelay_filter_abi_version   const int, equal to MAILRELAY_FILTER_ABI_VERSION of the header
 *                                  the library was built with. Write MAILRELAY_FILTER_DEFINE_ABI;
 *                                  once in one source file. The relay refuses to start when the
 *                                  symbol is missing or names a version it does not speak.
 *   mailrelay_filter_init          required: called once per process that loads the library.
 *   mailrelay_filter               required: called once per message.
 *   mailrelay_filter_free          required: releases what one mailrelay_filter() call returned.
 *   mailrelay_filter_cleanup       optional: called once when the relay stops using the library.
 *
 * ------------------------------------------------------------------------------------------------
 * Where the calls happen
 *
 * Isolated mode (the default) loads the library in a worker process that the relay supervises:
 * a crash (SIGSEGV, abort) or a call that overruns --filter-timeout kills only the worker; that
 * message gets a temporary failure (451 before the 250, a retry later at the client stage) and
 * a fresh worker is started for the next message, calling mailrelay_filter_init() again. The
 * worker's standard output is redirected to its standard error (which is the relay's log), so
 * printf() debugging cannot corrupt the relay's pipe to the worker.
 *
 * In-process mode loads the library into the relay itself, for speed, when the operator trusts
 * it: a crash there kills the relay, and a call that never returns cannot be stopped (the
 * message gets a temporary failure and every later message does too, until the relay restarts).
 *
 * Either way, calls for one configured filter never overlap: mailrelay_filter() is not called
 * again before the previous call and its mailrelay_filter_free() have returned. In in-process
 * mode mailrelay_filter_init() runs on the relay's main thread at start-up and the other calls
 * on a thread of their own (one per configured filter). Two filters configured with the same
 * library share its global variables in in-process mode (the library is loaded once); keep
 * state in the object that mailrelay_filter_init() returns.
 *
 * ------------------------------------------------------------------------------------------------
 * Memory ownership
 *
 *   - Every pointer in struct mailrelay_message (and the message content) belongs to the relay
 *     and is valid only during the mailrelay_filter() call: copy what you want to keep.
 *   - struct mailrelay_verdict is owned by the relay and zero-filled before each call; the filter
 *     fills it in. Its text and reason are fixed-size arrays (no allocation; a string that fills
 *     the whole array is cut at its end).
 *   - verdict->content, when not NULL, is memory the filter allocated (any allocator). The relay
 *     copies content_size bytes from it and then calls mailrelay_filter_free(state, verdict),
 *     which must release it. mailrelay_filter_free() is called after every mailrelay_filter()
 *     call, whatever it returned, so it is also the place for any other per-call clean-up.
 *   - The state pointer is the filter's own; mailrelay_filter_cleanup() releases it.
 */
#ifndef MAILRELAY_FILTER_H
#define MAILRELAY_FILTER_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The ABI this header describes. Changed whenever a struct or a signature below changes. */
#define MAILRELAY_FILTER_ABI_VERSION 1

/* Size of the text and reason arrays in struct mailrelay_verdict, terminating NUL included. */
#define MAILRELAY_FILTER_TEXT_SIZE 512

/* Size of the error buffer passed to mailrelay_filter_init(). */
#define MAILRELAY_FILTER_ERROR_SIZE 512

#if defined(__GNUC__) || defined(__clang__)
#define MAILRELAY_FILTER_EXPORT __attribute__((visibility("default")))
#else
#define MAILRELAY_FILTER_EXPORT
#endif

/* The ABI version the library was built for (see MAILRELAY_FILTER_DEFINE_ABI). */
MAILRELAY_FILTER_EXPORT extern const int mailrelay_filter_abi_version;

/* Put this once in one source file of the filter, at file scope. */
#define MAILRELAY_FILTER_DEFINE_ABI \
    MAILRELAY_FILTER_EXPORT const int mailrelay_filter_abi_version = MAILRELAY_FILTER_ABI_VERSION

/*
 * One message, as the relay hands it to mailrelay_filter(). All strings are NUL-terminated UTF-8
 * (or the raw bytes the client sent) and never NULL: a missing value is "".
 */
struct mailrelay_message {
    const char *spool_id;              /* the message's spool id (file names <spool_id>.content ...) */
    const char *stage;                 /* "server": before the 250; "client": before forwarding */
    const char *sender;                /* MAIL FROM address, "" for the null sender <> */
    const char *const *recipients;     /* RCPT TO addresses; recipients[recipient_count] is NULL */
    size_t recipient_count;
    const char *client_ip;             /* the SMTP client's address */
    const char *helo;                  /* its HELO/EHLO name ("" at the client stage) */
    const char *auth_user;             /* the SMTP AUTH user, "" when not authenticated */
    const char *message_id;            /* the Message-ID header, "" when there is none */
    const char *content_path;          /* the spool's content file (read it, do not write it) */
    const char *envelope_path;         /* the spool's envelope file (read it, do not write it) */
    const unsigned char *content;      /* the whole message (RFC 5322, CRLF line ends); not NUL-terminated */
    size_t content_size;
};

/*
 * What the filter decided. exit_code follows E-MailRelay's filter exit codes, so that every
 * filter kind answers in the same terms:
 *
 *     0          accept (also 101)
 *     1-99       reject: smtp_code and text are the reply (smtp_code 0: the relay's
 *                [filters] reject_code, normally 550; a 4xx smtp_code is a temporary failure)
 *     100        abandon: the filter has taken the message; acknowledge it, do not forward it
 *     102-105    the stage-dependent rescan / stop-scanning codes of E-MailRelay
 *     other      temporary failure (the message is kept and retried)
 *
 * content: replacement message content (the whole message, CRLF line ends), or NULL to keep the
 * message as it is. Only used with exit codes 0, 101 and 103.
 */
struct mailrelay_verdict {
    int exit_code;
    int smtp_code;                              /* 0, or a 4xx/5xx reply code */
    char text[MAILRELAY_FILTER_TEXT_SIZE];      /* reply text the SMTP client sees ("" = default) */
    char reason[MAILRELAY_FILTER_TEXT_SIZE];    /* a detail for the relay's log only */
    unsigned char *content;                     /* allocated by the filter; see mailrelay_filter_free() */
    size_t content_size;
};

/*
 * Called once before the first message. argument is the text after ';' in the spec ("" when
 * there is none). Set *state to anything the filter wants back in the other calls (it may stay
 * NULL). Return 0 on success; otherwise write a one-line explanation into error (error_size
 * bytes, MAILRELAY_FILTER_ERROR_SIZE) and return non-zero: the relay refuses to start and prints it.
 * The relay also calls this once in a throw-away process at start-up to check the library.
 */
MAILRELAY_FILTER_EXPORT int mailrelay_filter_init(const char *argument, void **state,
                                                  char *error, size_t error_size);

/*
 * Called once per message. Fill in *verdict and return 0. A non-zero return means the filter
 * itself failed (cannot read a file, out of memory): the message gets a temporary failure, with
 * verdict->reason (if set) in the log.
 */
MAILRELAY_FILTER_EXPORT int mailrelay_filter(void *state, const struct mailrelay_message *message,
                                             struct mailrelay_verdict *verdict);

/* Called after every mailrelay_filter() call: release verdict->content and anything else it took. */
MAILRELAY_FILTER_EXPORT void mailrelay_filter_free(void *state, struct mailrelay_verdict *verdict);

/* Optional: called once when the relay stops (or a worker is retired). Release the state. */
MAILRELAY_FILTER_EXPORT void mailrelay_filter_cleanup(void *state);

#ifdef __cplusplus
}
#endif

#endif /* MAILRELAY_FILTER_H */
