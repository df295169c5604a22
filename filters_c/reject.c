/*
 * reject.c: refuses messages that are too big or contain a forbidden word.
 *
 *     --filter 'so:/usr/local/lib/mailrelay/libreject.so;max=1000000;word=lottery win;word=viagra'
 *
 * The argument is a ';'-separated list of settings:
 *
 *     max=BYTES    reject messages larger than BYTES with 552 (0 or absent: no limit)
 *     word=TEXT    reject messages containing TEXT anywhere, ignoring case (up to 32 words)
 *     code=NNN     the reply code for a forbidden word (default 550; a 4xx code asks the client
 *                  to try again later)
 *
 * The forbidden word goes into the log (verdict->reason), never into the reply.
 */
#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mailrelay_filter.h"

MAILRELAY_FILTER_DEFINE_ABI;

#define MAX_WORDS 32

struct policy {
    unsigned long long max_size;
    int word_code;
    size_t word_count;
    char *words[MAX_WORDS];
};

static void release(struct policy *policy)
{
    for (size_t i = 0; i < policy->word_count; i++)
        free(policy->words[i]);
    free(policy);
}

/* One "key=value" setting; the token is modified in place (trimmed). */
static int apply(struct policy *policy, char *token, char *error, size_t error_size)
{
    char *end = token + strlen(token);
    while (isspace((unsigned char)*token))
        token++;
    while (end > token && isspace((unsigned char)end[-1]))
        *--end = '\0';
    if (*token == '\0')
        return 1;
    char *value = strchr(token, '=');
    if (value == NULL) {
        snprintf(error, error_size, "reject: '%s' is not key=value", token);
        return 0;
    }
    *value++ = '\0';
    if (strcmp(token, "max") == 0 || strcmp(token, "code") == 0) {
        char *rest;
        errno = 0;
        unsigned long long number = strtoull(value, &rest, 10);
        if (*value == '\0' || *rest != '\0' || errno != 0 || *value == '-') {
            snprintf(error, error_size, "reject: %s=%s is not a number", token, value);
            return 0;
        }
        if (token[0] == 'm') {
            policy->max_size = number;
        } else if (number < 400 || number > 599) {
            snprintf(error, error_size, "reject: code=%s is not a 4xx or 5xx reply code", value);
            return 0;
        } else {
            policy->word_code = (int)number;
        }
    } else if (strcmp(token, "word") == 0) {
        if (*value == '\0' || policy->word_count == MAX_WORDS) {
            snprintf(error, error_size, *value ? "reject: more than %d words" : "reject: empty word", MAX_WORDS);
            return 0;
        }
        if ((policy->words[policy->word_count] = strdup(value)) == NULL) {
            snprintf(error, error_size, "reject: out of memory");
            return 0;
        }
        policy->word_count++;
    } else {
        snprintf(error, error_size, "reject: unknown setting '%s' (max, word, code)", token);
        return 0;
    }
    return 1;
}

int mailrelay_filter_init(const char *argument, void **state, char *error, size_t error_size)
{
    struct policy *policy = calloc(1, sizeof *policy);
    char *copy = strdup(argument);
    if (policy == NULL || copy == NULL) {
        free(policy);
        free(copy);
        snprintf(error, error_size, "reject: out of memory");
        return 1;
    }
    policy->word_code = 550;
    int ok = 1;
    char *saved = NULL;
    for (char *token = strtok_r(copy, ";", &saved); ok && token != NULL; token = strtok_r(NULL, ";", &saved))
        ok = apply(policy, token, error, error_size);
    free(copy);
    if (!ok) {
        release(policy);
        return 1;
    }
    *state = policy;
    return 0;
}

/* Case-insensitive search of an ASCII word in a byte buffer. */
static int contains(const unsigned char *data, size_t size, const char *word)
{
    size_t length = strlen(word);
    if (length > size)
        return 0;
    for (size_t i = 0; i + length <= size; i++) {
        size_t j = 0;
        while (j < length && tolower(data[i + j]) == tolower((unsigned char)word[j]))
            j++;
        if (j == length)
            return 1;
    }
    return 0;
}

int mailrelay_filter(void *state, const struct mailrelay_message *message, struct mailrelay_verdict *verdict)
{
    const struct policy *policy = state;
    if (policy->max_size > 0 && message->content_size > policy->max_size) {
        verdict->exit_code = 1;
        verdict->smtp_code = 552;
        snprintf(verdict->text, sizeof verdict->text, "Message too big: %zu bytes, the limit is %llu",
                 message->content_size, policy->max_size);
        return 0;
    }
    for (size_t i = 0; i < policy->word_count; i++) {
        if (contains(message->content, message->content_size, policy->words[i])) {
            verdict->exit_code = 1;
            verdict->smtp_code = policy->word_code;
            snprintf(verdict->text, sizeof verdict->text, "Message refused by content policy");
            snprintf(verdict->reason, sizeof verdict->reason, "forbidden word '%s' from %s",
                     policy->words[i], message->sender[0] ? message->sender : "<>");
            return 0;
        }
    }
    verdict->exit_code = 0;
    return 0;
}

void mailrelay_filter_free(void *state, struct mailrelay_verdict *verdict)
{
    (void)state;
    (void)verdict;  /* this filter never returns content */
}

void mailrelay_filter_cleanup(void *state)
{
    if (state != NULL)
        release(state);
}
