/*
 * gw_alloc.c - allocation wrappers that abort on out-of-memory, so callers
 * never carry error paths for a failure they cannot handle anyway.
 *
 * One policy for the whole daemon: gw_alloc_init() hands the same wrappers
 * to libevent, jansson and OpenSSL, so an evbuffer_new(), a json_object()
 * or an event_new() never returns NULL for lack of memory either (a NULL
 * replay buffer once silently turned retries off). What those libraries
 * still return NULL or -1 for is a real error of their input, and is
 * checked where it can happen. gw_main then puts jansson on the metering
 * allocator of gw_json.c (memory budgets), which allocates with gw_malloc
 * too: its only NULL is a budget's refusal, which fails the parse.
 */
#include "gw_core.h"

#include <event2/event.h>
#include <jansson.h>
#include <openssl/crypto.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static void
oom(size_t n)
{
    char msg[96];
    int len = snprintf(msg, sizeof(msg), "gatherd: [emerg] out of memory allocating %zu bytes\n", n);
    if (len > 0 && write(STDERR_FILENO, msg, (size_t)len) < 0) {
        /* nothing left to report to */
    }
    abort();
}

void *
gw_malloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    if (p == NULL)
        oom(n);
    return p;
}

void *
gw_calloc(size_t count, size_t n)
{
    void *p = calloc(count ? count : 1, n ? n : 1);
    if (p == NULL)
        oom(count * n);
    return p;
}

void *
gw_realloc(void *p, size_t n)
{
    void *q = realloc(p, n ? n : 1);
    if (q == NULL)
        oom(n);
    return q;
}

char *
gw_strndup(const char *s, size_t n)
{
    char *d = gw_malloc(n + 1);
    memcpy(d, s, n);
    d[n] = '\0';
    return d;
}

char *
gw_strdup(const char *s)
{
    return gw_strndup(s, strlen(s));
}

void
gw_grow(void **arr, size_t *cap, size_t need, size_t elem)
{
    if (need <= *cap)
        return;
    size_t ncap = *cap ? *cap * 2 : 8;
    while (ncap < need)
        ncap *= 2;
    *arr = gw_realloc(*arr, ncap * elem);
    *cap = ncap;
}

static void *
ssl_malloc(size_t n, const char *file, int line)
{
    GW_UNUSED(file);
    GW_UNUSED(line);
    return gw_malloc(n);
}

static void *
ssl_realloc(void *p, size_t n, const char *file, int line)
{
    GW_UNUSED(file);
    GW_UNUSED(line);
    return gw_realloc(p, n);
}

static void
ssl_free(void *p, const char *file, int line)
{
    GW_UNUSED(file);
    GW_UNUSED(line);
    free(p);
}

void
gw_alloc_init(void)
{
    event_set_mem_functions(gw_malloc, gw_realloc, free);
    json_set_alloc_funcs(gw_malloc, free);
    /* fails only once OpenSSL has allocated: then its own allocator stays */
    if (!CRYPTO_set_mem_functions(ssl_malloc, ssl_realloc, ssl_free)) {
        static const char msg[] = "gatherd: [warn] OpenSSL allocated before start-up; its allocations keep its own allocator\n";
        if (write(STDERR_FILENO, msg, sizeof(msg) - 1) < 0) {
            /* nowhere to report it */
        }
    }
}
