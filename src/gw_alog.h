/*
 * gw_alog.h - the access log, and the writer thread that puts the access
 * log and a file error log on disk.
 *
 * No worker ever writes to a log file: every thread appends its lines to
 * its own bounded in-memory buffers (one for access lines, one for error
 * lines), and one writer thread swaps those buffers out and write(2)s them,
 * every 100 ms or sooner when a buffer is half full. A full buffer drops
 * lines and counts them; the writer logs how many were dropped. SIGUSR1
 * (gw_alog_reopen) makes the writer reopen both files (logrotate).
 *
 * The record of the request being answered (gw_alog_rec_t) lives in the
 * connection; the route handlers fill in what only they know (upstream
 * time, failed calls) and gw_conn writes the line when the response is
 * complete or the connection dies in the middle of it.
 */
#ifndef GW_ALOG_H
#define GW_ALOG_H

#include "gw_config.h"
#include "gw_core.h"
#include "gw_fail.h"

/* Bytes of one thread's buffer for one log; lines beyond it are dropped. */
#define GW_ALOG_BUF_BYTES (256 * 1024)

/* What the access line of one request says beyond the request itself. */
typedef struct gw_alog_rec_s {
    uint64_t start_us;    /* first byte of the request seen; 0: none yet */
    uint64_t up_start_us; /* proxy routes: handed to the backend */
    int64_t up_us;        /* upstream time; -1: no backend involved */
    int status;           /* 0: no response started */
    uint64_t bytes;       /* response body bytes */
    bool no_head;         /* the request head was not complete (400, 408, 431...) */
    const char *route;    /* the route's pattern (borrowed from the conn's configuration); NULL: none */
    size_t fail_len;
    char fail[240]; /* "call:code,call:code" */
} gw_alog_rec_t;

/* Empties r for the next request. */
void gw_alog_rec_reset(gw_alog_rec_t *r);
/* Adds a failed call (its name borrowed, copied) and its code to r. */
void gw_alog_rec_fail(gw_alog_rec_t *r, const char *call, gw_fail_t code);

/* Queues the access line of request req (borrowed) from client (text) as
 * cfg->log says; a no-op when the access log is off. Never blocks. */
void gw_alog_request(const gw_config_t *cfg, const gw_req_t *req, const char *client, const gw_alog_rec_t *r);

/*
 * Opens cfg's log files and starts the writer thread; from then on the
 * error log goes where cfg says. GW_ERR with the reason in err when a file
 * cannot be opened (nothing started). Main thread, once.
 */
int gw_alog_start(const gw_config_t *cfg, char *err, size_t errlen);
/* After a reload: the writer moves to cfg's files (opened by the writer;
 * a failure is logged and the previous file kept). */
void gw_alog_apply(const gw_config_t *cfg);
/* Main thread: waits until the writer has written every line queued
 * before the call (start-up lines before the daemon says it is ready), at
 * most timeout_ms (the writer may be stuck on a pipe nobody reads). */
void gw_alog_sync(int timeout_ms);
/* SIGUSR1: the writer reopens both files at their paths. */
void gw_alog_reopen(void);
/* Flushes everything, stops the writer and closes the files; the error log
 * goes back to stderr. After the workers stopped. */
void gw_alog_stop(void);

/* For gw_log: queues an error line (n bytes, newline included) while the
 * writer runs (whether the error log is a file or stderr); false before it
 * started and after it stopped, when the caller writes it to stderr itself. */
bool gw_alog_error_line(const char *line, size_t n);

#endif
