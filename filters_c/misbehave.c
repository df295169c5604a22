/*
 * misbehave.c: a filter that breaks on request, for testing the relay's isolation of compiled
 * filters. Not for production.
 *
 * What it does to a message depends on its header "X-Misbehave:":
 *
 *     crash          writes through a NULL pointer (SIGSEGV)
 *     abort          calls abort() (SIGABRT)
 *     hang           never returns
 *     error          returns non-zero (the filter's own failure)
 *     exit=N TEXT    answers with exit code N and, for a rejection, TEXT ("451 try later" sets
 *                    the reply code too)
 *     (absent)       accepts and adds "X-Misbehave-Worker: pid=P calls=N", the process it runs
 *                    in and how many messages that process has filtered
 *
 * The argument "fail-init" makes mailrelay_filter_init() fail, "crash-init" makes it crash.
 * Build-time knobs for ABI tests: -DMISBEHAVE_ABI_VERSION=N exports a different version,
 * -DMISBEHAVE_NO_ABI_SYMBOL exports none.
 */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#include "mailrelay_filter.h"

#ifndef MISBEHAVE_NO_ABI_SYMBOL
#ifdef MISBEHAVE_ABI_VERSION
MAILRELAY_FILTER_EXPORT const int mailrelay_filter_abi_version = MISBEHAVE_ABI_VERSION;
#else
MAILRELAY_FILTER_DEFINE_ABI;
#endif
#endif

static unsigned long calls;

static void crash(void)
{
    volatile int *nowhere = NULL;
    *nowhere = 1;
    raise(SIGSEGV);  /* in case the store was optimised away or the page is mapped */
}

int mailrelay_filter_init(const char *argument, void **state, char *error, size_t error_size)
{
    *state = NULL;
    if (strcmp(argument, "fail-init") == 0) {
        snprintf(error, error_size, "misbehave: asked to fail in init");
        return 1;
    }
    if (strcmp(argument, "crash-init") == 0)
        crash();
    return 0;
}

/* The value of the X-Misbehave header (up to the end of its line), or NULL. Headers only. */
static const char *instruction(const struct mailrelay_message *message, size_t *length)
{
    static const char name[] = "X-Misbehave:";
    const char *data = (const char *)message->content;
    const char *end = data + message->content_size;
    for (const char *line = data; line < end;) {
        const char *eol = memchr(line, '\n', (size_t)(end - line));
        if (eol == NULL)
            eol = end;
        if (eol == line || (eol == line + 1 && line[0] == '\r'))
            return NULL;  /* the blank line: end of the header section */
        if ((size_t)(eol - line) >= sizeof name - 1 && strncasecmp(line, name, sizeof name - 1) == 0) {
            const char *value = line + sizeof name - 1;
            while (value < eol && *value == ' ')
                value++;
            const char *stop = eol;
            if (stop > value && stop[-1] == '\r')
                stop--;
            *length = (size_t)(stop - value);
            return value;
        }
        line = eol + 1;
    }
    return NULL;
}

static int is(const char *value, size_t length, const char *word)
{
    return length == strlen(word) && strncmp(value, word, length) == 0;
}

int mailrelay_filter(void *state, const struct mailrelay_message *message, struct mailrelay_verdict *verdict)
{
    (void)state;
    calls++;
    size_t length = 0;
    const char *value = instruction(message, &length);
    if (value != NULL && is(value, length, "crash"))
        crash();
    if (value != NULL && is(value, length, "abort"))
        abort();
    if (value != NULL && is(value, length, "hang"))
        for (;;)
            pause();
    if (value != NULL && is(value, length, "error")) {
        snprintf(verdict->reason, sizeof verdict->reason, "misbehave: asked to fail");
        return 1;
    }
    if (value != NULL && length > 5 && strncmp(value, "exit=", 5) == 0) {
        char buffer[MAILRELAY_FILTER_TEXT_SIZE];
        snprintf(buffer, sizeof buffer, "%.*s", (int)(length - 5), value + 5);
        char *text = NULL;
        verdict->exit_code = (int)strtol(buffer, &text, 10);
        while (*text == ' ')
            text++;
        if (text[0] >= '4' && text[0] <= '5' && strlen(text) >= 3 && (text[3] == ' ' || text[3] == '\0')) {
            verdict->smtp_code = atoi(text);
            text += text[3] ? 4 : 3;
        }
        snprintf(verdict->text, sizeof verdict->text, "%s", text);
        return 0;
    }
    char stamp[128];
    int size = snprintf(stamp, sizeof stamp, "X-Misbehave-Worker: pid=%ld calls=%lu\r\n", (long)getpid(), calls);
    verdict->content = malloc((size_t)size + message->content_size);
    if (verdict->content == NULL)
        return 1;
    memcpy(verdict->content, stamp, (size_t)size);
    if (message->content_size > 0)
        memcpy(verdict->content + size, message->content, message->content_size);
    verdict->content_size = (size_t)size + message->content_size;
    verdict->exit_code = 0;
    return 0;
}

void mailrelay_filter_free(void *state, struct mailrelay_verdict *verdict)
{
    (void)state;
    free(verdict->content);
}
