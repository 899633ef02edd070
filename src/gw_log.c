/*
 * gw_log.c - the error log (see gw_log.h). Lines go to stderr, which the
 * service manager (systemd, a container runtime) collects. Once the log
 * writer runs (gw_alog.h) every line is queued for it, and it writes them
 * to "log.error_log" (a file or stderr): no thread but the writer ever
 * waits on the error log. Before it starts (start-up, -t) and after it
 * stopped, lines go straight to stderr with one blocking write(2): only the
 * main thread logs then.
 *
 * The rate limit of a call site is one 64-bit word, the current window's
 * second and the number of lines written in it, moved on with
 * compare-and-swap, plus a counter of dropped lines that the summary takes
 * with an atomic exchange: every dropped line is counted in exactly one
 * summary, whoever writes it.
 */
#include "gw_log.h"
#include "gw_alog.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

static gw_log_level_t log_level = GW_LOG_NOTICE;
static __thread char thread_tag[16] = "main";

static const char *const level_names[] = { "debug", "info", "notice", "warn", "error", "emerg" };

void
gw_log_set_level(gw_log_level_t level)
{
    __atomic_store_n(&log_level, level, __ATOMIC_RELAXED); /* a reload sets it while workers log */
}

gw_log_level_t
gw_log_get_level(void)
{
    return __atomic_load_n(&log_level, __ATOMIC_RELAXED);
}

void
gw_log_set_thread(const char *tag)
{
    snprintf(thread_tag, sizeof(thread_tag), "%s", tag);
}

/* Formats and emits one line stamped tv. */
static void __attribute__((format(printf, 3, 0)))
log_va(const struct timeval *tv, gw_log_level_t level, const char *fmt, va_list ap)
{
    int saved_errno = errno;
    char line[2048];
    struct tm tm;
    localtime_r(&tv->tv_sec, &tm);
    size_t n = strftime(line, sizeof(line), "%Y-%m-%dT%H:%M:%S", &tm);
    int k = snprintf(line + n, sizeof(line) - n, ".%03ld [%s] %s: ", (long)(tv->tv_usec / 1000),
                     level_names[level], thread_tag);
    if (k > 0)
        n += (size_t)k;
    k = vsnprintf(line + n, sizeof(line) - n, fmt, ap);
    if (k > 0)
        n += (size_t)k;
    if (n > sizeof(line) - 2)
        n = sizeof(line) - 2;
    line[n++] = '\n';
    if (!gw_alog_error_line(line, n) && write(STDERR_FILENO, line, n) < 0) {
        /* stderr is gone; nowhere left to report it */
    }
    errno = saved_errno;
}

void
gw_log(gw_log_level_t level, const char *fmt, ...)
{
    if (level < gw_log_get_level())
        return;
    struct timeval tv;
    gettimeofday(&tv, NULL);
    va_list ap;
    va_start(ap, fmt);
    log_va(&tv, level, fmt, ap);
    va_end(ap);
}

/* --- rate limits ----------------------------------------------------------- */

#define RL_COUNT_BITS 16
#define RL_COUNT_MASK ((UINT64_C(1) << RL_COUNT_BITS) - 1)

static gw_log_rl_t *rl_sites; /* atomic head; sites are statics, never freed */

static void
rl_register(gw_log_rl_t *rl)
{
    if (__atomic_load_n(&rl->registered, __ATOMIC_ACQUIRE) || __atomic_exchange_n(&rl->registered, 1, __ATOMIC_ACQ_REL))
        return;
    gw_log_rl_t *head = __atomic_load_n(&rl_sites, __ATOMIC_RELAXED);
    do
        rl->next = head;
    while (!__atomic_compare_exchange_n(&rl_sites, &head, rl, true, __ATOMIC_RELEASE, __ATOMIC_RELAXED));
}

/* Writes the summary of rl's dropped lines, if any (the caller ended their window). */
static void
rl_summary(gw_log_rl_t *rl)
{
    uint64_t n = __atomic_exchange_n(&rl->dropped, 0, __ATOMIC_RELAXED);
    if (n > 0)
        gw_log((gw_log_level_t)__atomic_load_n(&rl->level, __ATOMIC_RELAXED),
               "... and %llu more like this in the last second: \"%s\"", (unsigned long long)n, rl->fmt);
}

void
gw_log_limited(gw_log_rl_t *rl, gw_log_level_t level, const char *fmt, ...)
{
    if (level < gw_log_get_level())
        return;
    /* Windows are the seconds of the lines' own time stamps: the log never
     * shows more than GW_LOG_RL_BURST lines of a site with the same second. */
    struct timeval tv;
    gettimeofday(&tv, NULL);
    uint64_t sec = (uint64_t)tv.tv_sec;
    uint64_t word = __atomic_load_n(&rl->word, __ATOMIC_RELAXED);
    bool ended = false;
    for (;;) {
        uint64_t next;
        if (word >> RL_COUNT_BITS != sec)
            next = sec << RL_COUNT_BITS | 1; /* a new window, and this line is its first */
        else if ((word & RL_COUNT_MASK) < GW_LOG_RL_BURST)
            next = word + 1;
        else
            break; /* over the burst: dropped */
        if (__atomic_compare_exchange_n(&rl->word, &word, next, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
            ended = word >> RL_COUNT_BITS != sec;
            break;
        }
    }
    bool pass = ended || (word >> RL_COUNT_BITS == sec && (word & RL_COUNT_MASK) < GW_LOG_RL_BURST);
    if (ended)
        rl_summary(rl); /* the previous window's, before this window's first line */
    if (!pass) {
        rl_register(rl);
        __atomic_store_n(&rl->level, (int)level, __ATOMIC_RELAXED);
        __atomic_add_fetch(&rl->dropped, 1, __ATOMIC_RELAXED);
        return;
    }
    va_list ap;
    va_start(ap, fmt);
    log_va(&tv, level, fmt, ap);
    va_end(ap);
}

void
gw_log_rl_flush(bool all)
{
    struct timeval tv;
    gettimeofday(&tv, NULL);
    uint64_t sec = (uint64_t)tv.tv_sec;
    for (gw_log_rl_t *rl = __atomic_load_n(&rl_sites, __ATOMIC_ACQUIRE); rl; rl = rl->next) {
        if (__atomic_load_n(&rl->dropped, __ATOMIC_RELAXED) == 0)
            continue;
        uint64_t word = __atomic_load_n(&rl->word, __ATOMIC_RELAXED);
        /* A window that is over is closed here (the next line starts a new
         * one with its full burst); a current one only when all. */
        while (word >> RL_COUNT_BITS != sec &&
               !__atomic_compare_exchange_n(&rl->word, &word, sec << RL_COUNT_BITS, true, __ATOMIC_RELAXED,
                                            __ATOMIC_RELAXED))
            ;
        if (all || word >> RL_COUNT_BITS != sec)
            rl_summary(rl);
    }
}
