/*
 * stamp.c: adds one header line at the top of every message.
 *
 *     --filter 'so:/usr/local/lib/mailrelay/libstamp.so;X-Checked-By: relay1'
 *
 * The argument is the header line (default "X-Filtered-By: mailrelay-stamp"); it must look like
 * "Name: value" and be a single line. Shows the part of the ABI that returns replacement content:
 * the new message is malloc'd here and released in mailrelay_filter_free().
 */
#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mailrelay_filter.h"

MAILRELAY_FILTER_DEFINE_ABI;

struct stamp {
    char *line;        /* "Name: value\r\n" */
    size_t length;
};

static int valid_header(const char *text, char *error, size_t error_size)
{
    const char *colon = strchr(text, ':');
    if (colon == NULL || colon == text) {
        snprintf(error, error_size, "stamp: %s is not a header line (Name: value)", text);
        return 0;
    }
    for (const char *p = text; p < colon; p++) {
        /* RFC 5322 field names: printable ASCII except the colon, no spaces */
        if (*p <= 32 || *p >= 127) {
            snprintf(error, error_size, "stamp: bad character in header name of '%s'", text);
            return 0;
        }
    }
    if (strpbrk(text, "\r\n") != NULL) {
        snprintf(error, error_size, "stamp: the header must be a single line");
        return 0;
    }
    return 1;
}

int mailrelay_filter_init(const char *argument, void **state, char *error, size_t error_size)
{
    while (isspace((unsigned char)*argument))
        argument++;
    const char *text = *argument ? argument : "X-Filtered-By: mailrelay-stamp";
    if (!valid_header(text, error, error_size))
        return 1;
    struct stamp *stamp = malloc(sizeof *stamp);
    if (stamp == NULL) {
        snprintf(error, error_size, "stamp: out of memory");
        return 1;
    }
    stamp->length = strlen(text) + 2;
    stamp->line = malloc(stamp->length + 1);
    if (stamp->line == NULL) {
        free(stamp);
        snprintf(error, error_size, "stamp: out of memory");
        return 1;
    }
    snprintf(stamp->line, stamp->length + 1, "%s\r\n", text);
    *state = stamp;
    return 0;
}

int mailrelay_filter(void *state, const struct mailrelay_message *message, struct mailrelay_verdict *verdict)
{
    const struct stamp *stamp = state;
    unsigned char *content = malloc(stamp->length + message->content_size);
    if (content == NULL) {
        snprintf(verdict->reason, sizeof verdict->reason, "stamp: out of memory");
        return 1;  /* a temporary failure: the message is kept and retried */
    }
    memcpy(content, stamp->line, stamp->length);
    if (message->content_size > 0)
        memcpy(content + stamp->length, message->content, message->content_size);
    verdict->exit_code = 0;
    verdict->content = content;
    verdict->content_size = stamp->length + message->content_size;
    return 0;
}

void mailrelay_filter_free(void *state, struct mailrelay_verdict *verdict)
{
    (void)state;
    free(verdict->content);
    verdict->content = NULL;
}

void mailrelay_filter_cleanup(void *state)
{
    struct stamp *stamp = state;
    if (stamp != NULL) {
        free(stamp->line);
        free(stamp);
    }
}
