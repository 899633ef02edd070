/*
 * gw_log.h - the error log. One line per event: time, level, worker, then
 * what happened, to whom, and while doing what. Each line is emitted whole
 * (one write(2), or one copy into the log writer's buffer, gw_alog.h), so
 * lines from different threads never interleave.
 *
 * Lines that a client or a backend can cause once per request go through
 * gw_log_rl(): per call site, the first GW_LOG_RL_BURST lines of each
 * second are written, the others only counted, and one summary line says
 * how many were dropped ("... and 13640 more like this in the last second")
 * when that second is over: at the next line of the same call site, or
 * within 100 ms from the log writer thread, or at exit.
 */
#ifndef GW_LOG_H
#define GW_LOG_H

#include "gw_core.h"

typedef enum { GW_LOG_DEBUG, GW_LOG_INFO, GW_LOG_NOTICE, GW_LOG_WARN, GW_LOG_ERR, GW_LOG_EMERG } gw_log_level_t;

/* Lines of one rate-limited call site written per second; the rest are counted. */
#define GW_LOG_RL_BURST 10

/* Lines below this level are dropped. Set at start-up and by a reload ("log.level"). */
void gw_log_set_level(gw_log_level_t level);
gw_log_level_t gw_log_get_level(void);
/* Tag of the calling thread ("main", "w0", ...), copied; shown on each line. */
void gw_log_set_thread(const char *tag);

void gw_log(gw_log_level_t level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#define gw_log_debug(...) do { if (gw_log_get_level() <= GW_LOG_DEBUG) gw_log(GW_LOG_DEBUG, __VA_ARGS__); } while (0)

/* The rate limit of one call site (a static of gw_log_rl()); its fields
 * are gw_log.c's. */
typedef struct gw_log_rl_s {
    const char *fmt;          /* names the kind of line in the summary */
    uint64_t word;            /* atomic: window second << 16 | lines written in it */
    uint64_t dropped;         /* atomic: lines dropped and not yet summarised */
    int level;                /* atomic: of the last dropped line, for the summary */
    int registered;           /* atomic: on the list gw_log_rl_flush() walks */
    struct gw_log_rl_s *next; /* that list; set once, before it is published */
} gw_log_rl_t;

/* gw_log() under the rate limit of the call site rl. Thread-safe, no lock. */
void gw_log_limited(gw_log_rl_t *rl, gw_log_level_t level, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

/* gw_log() for a line a client or backend can cause per request: rate
 * limited per call site (format must be a string literal). */
#define gw_log_rl(level, format, ...)                                                                                  \
    do {                                                                                                               \
        static gw_log_rl_t gw_log_rl_site_ = { .fmt = format };                                                        \
        gw_log_limited(&gw_log_rl_site_, (level), format, ##__VA_ARGS__);                                              \
    } while (0)

/* Writes the summary of every call site whose window is over (every one
 * with dropped lines when all). The log writer calls it every 100 ms and
 * at exit. */
void gw_log_rl_flush(bool all);

#endif
