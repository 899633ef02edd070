/*
 * gw_log.c - the error log (see gw_log.h). Lines go to stderr, which the
 * service manager (systemd, a container runtime) collects; once the log
 * writer runs (gw_alog.h) they are queued for it instead, and it writes
 * them to "log.error_log" (a file or stderr) without blocking the caller.
 * Before that (start-up, -t) they go straight to stderr. A line is
 * formatted into a stack buffer and written with one write(2); stderr is
 * left blocking on purpose: a log line is rare and small, and losing the
 * reason for an outage is worse than a rare short stall.
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

void
gw_log(gw_log_level_t level, const char *fmt, ...)
{
    if (level < gw_log_get_level())
        return;
    int saved_errno = errno;
    char line[2048];
    struct timeval tv;
    struct tm tm;
    gettimeofday(&tv, NULL);
    localtime_r(&tv.tv_sec, &tm);
    size_t n = strftime(line, sizeof(line), "%Y-%m-%dT%H:%M:%S", &tm);
    int k = snprintf(line + n, sizeof(line) - n, ".%03ld [%s] %s: ", (long)(tv.tv_usec / 1000),
                     level_names[level], thread_tag);
    if (k > 0)
        n += (size_t)k;
    va_list ap;
    va_start(ap, fmt);
    k = vsnprintf(line + n, sizeof(line) - n, fmt, ap);
    va_end(ap);
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
