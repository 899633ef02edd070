/*
 * gw_alloc.c - allocation wrappers that abort on out-of-memory, so callers
 * never carry error paths for a failure they cannot handle anyway.
 */
#include "gw_core.h"

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
