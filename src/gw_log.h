/*
 * gw_log.h - the error log. One line per event: time, level, worker, then
 * what happened, to whom, and while doing what. Each line is emitted with a
 * single write(2) so lines from different threads never interleave.
 */
#ifndef GW_LOG_H
#define GW_LOG_H

#include "gw_core.h"

typedef enum { GW_LOG_DEBUG, GW_LOG_INFO, GW_LOG_NOTICE, GW_LOG_WARN, GW_LOG_ERR, GW_LOG_EMERG } gw_log_level_t;

/* Lines below this level are dropped. Set at start-up and by a reload ("log.level"). */
void gw_log_set_level(gw_log_level_t level);
gw_log_level_t gw_log_get_level(void);
/* Tag of the calling thread ("main", "w0", ...), copied; shown on each line. */
void gw_log_set_thread(const char *tag);

void gw_log(gw_log_level_t level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#define gw_log_debug(...) do { if (gw_log_get_level() <= GW_LOG_DEBUG) gw_log(GW_LOG_DEBUG, __VA_ARGS__); } while (0)

#endif
