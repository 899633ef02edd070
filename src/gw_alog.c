/*
 * gw_alog.c - the access log and the log writer thread (see gw_alog.h).
 *
 * Each thread that logs gets a tbuf_t on first use, registered in a list
 * the writer walks. A tbuf holds two buffers (access, error), each behind
 * the tbuf's mutex: a worker holds it only to memcpy one line, the writer
 * only to swap the filled buffer with an empty one of its own, so neither
 * ever waits on disk. Thread buffers live until gw_alog_stop().
 *
 * Lines of different threads are written buffer by buffer, so two lines of
 * different workers may appear out of time order by up to one flush
 * interval; each line carries its own time.
 */
#include "gw_alog.h"
#include "gw_http.h"
#include "gw_log.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stddef.h>
#include <llhttp.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

enum { S_ACCESS, S_ERROR, S_N };

typedef struct tbuf_s {
    pthread_mutex_t mu;
    char *data[S_N];
    size_t len[S_N];
    uint64_t dropped[S_N];
    struct tbuf_s *next;
} tbuf_t;

static __thread tbuf_t *my_tbuf;

static pthread_mutex_t reg_mu = PTHREAD_MUTEX_INITIALIZER;
static tbuf_t *tbufs; /* under reg_mu */

/* Control of the writer, under ctl_mu. */
static pthread_mutex_t ctl_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t ctl_cond = PTHREAD_COND_INITIALIZER;
static bool ctl_stop, ctl_kick, ctl_reopen;
static pthread_cond_t synced_cond = PTHREAD_COND_INITIALIZER;
static uint64_t sync_asked, sync_done; /* gw_alog_sync(): flushes asked for, and done */
static char *want_path[S_N]; /* NULL: stderr (error) / off or stderr (access, see want_access) */
static bool want_access;     /* the access log is on */

static pthread_t writer;
static bool running;           /* main thread only */
static int err_to_file;        /* atomic: error lines go to the writer (while it runs) */
static int fds[S_N] = {-1, 2}; /* writer thread only once running */
static char *cur_path[S_N];    /* writer only: what fds[] are open on; NULL: stderr or off */

void
gw_alog_rec_reset(gw_alog_rec_t *r)
{
    memset(r, 0, offsetof(gw_alog_rec_t, fail));
    r->up_us = -1;
    r->fail[0] = '\0';
}

void
gw_alog_rec_fail(gw_alog_rec_t *r, const char *call, gw_fail_t f)
{
    const char *code = gw_fail_name(f);
    size_t need = strlen(call) + strlen(code) + 2;
    if (r->fail_len + need >= sizeof(r->fail))
        return; /* a long list is cut, never overrun */
    int n =
        snprintf(r->fail + r->fail_len, sizeof(r->fail) - r->fail_len, "%s%s:%s", r->fail_len ? "," : "", call, code);
    if (n > 0)
        r->fail_len += (size_t)n;
}

static tbuf_t *
tbuf_get(void)
{
    if (my_tbuf)
        return my_tbuf;
    tbuf_t *t = gw_calloc(1, sizeof(*t));
    pthread_mutex_init(&t->mu, NULL);
    for (int i = 0; i < S_N; i++)
        t->data[i] = gw_malloc(GW_ALOG_BUF_BYTES);
    pthread_mutex_lock(&reg_mu);
    t->next = tbufs;
    tbufs = t;
    pthread_mutex_unlock(&reg_mu);
    my_tbuf = t;
    return t;
}

/* Appends a line to the calling thread's buffer s; dropped when full. */
static void
queue_line(int s, const char *line, size_t n)
{
    tbuf_t *t = tbuf_get();
    bool kick = false;
    pthread_mutex_lock(&t->mu);
    if (t->len[s] + n > GW_ALOG_BUF_BYTES) {
        t->dropped[s]++;
    } else {
        memcpy(t->data[s] + t->len[s], line, n);
        t->len[s] += n;
        kick = t->len[s] >= GW_ALOG_BUF_BYTES / 2 && t->len[s] - n < GW_ALOG_BUF_BYTES / 2;
    }
    pthread_mutex_unlock(&t->mu);
    if (kick) { /* once per fill: wake the writer early */
        pthread_mutex_lock(&ctl_mu);
        ctl_kick = true;
        pthread_cond_signal(&ctl_cond);
        pthread_mutex_unlock(&ctl_mu);
    }
}

bool
gw_alog_error_line(const char *line, size_t n)
{
    if (!__atomic_load_n(&err_to_file, __ATOMIC_ACQUIRE))
        return false;
    queue_line(S_ERROR, line, n);
    return true;
}

/* --- formatting ---------------------------------------------------------- */

typedef struct {
    char *p, *end;
} out_t;

static void
out_mem(out_t *o, const char *s, size_t n)
{
    if ((size_t)(o->end - o->p) < n)
        n = (size_t)(o->end - o->p);
    memcpy(o->p, s, n);
    o->p += n;
}

static void
out_str(out_t *o, const char *s)
{
    out_mem(o, s, strlen(s));
}

static void __attribute__((format(printf, 2, 3))) out_fmt(out_t *o, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(o->p, (size_t)(o->end - o->p), fmt, ap);
    va_end(ap);
    size_t avail = (size_t)(o->end - o->p);
    if (n > 0) /* vsnprintf wrote at most avail - 1 bytes and a NUL */
        o->p += (size_t)n < avail ? (size_t)n : avail ? avail - 1 : 0;
}

/* Client-supplied bytes: '"', '\\' and bytes outside printable ASCII become
 * \\xHH (text, as nginx escapes) or \\u00HH (JSON), so a line can never be
 * split or forged by a header value. A field is cut at FIELD_MAX bytes of
 * output, so that every field fits in the line and a JSON line stays whole. */
#define FIELD_MAX 1024

static void
out_esc(out_t *o, const char *s, size_t n, bool json)
{
    static const char hex[] = "0123456789abcdef";
    char *limit = o->end - o->p > FIELD_MAX ? o->p + FIELD_MAX : o->end;
    for (size_t i = 0; i < n && limit - o->p > 6; i++) {
        unsigned char ch = (unsigned char)s[i];
        if (ch == '"' || ch == '\\' || ch < 0x20 || ch >= 0x7f) {
            if (json && (ch == '"' || ch == '\\')) {
                *o->p++ = '\\';
                *o->p++ = (char)ch;
            } else {
                out_str(o, json ? "\\u00" : "\\x");
                *o->p++ = hex[ch >> 4];
                *o->p++ = hex[ch & 15];
            }
        } else {
            *o->p++ = (char)ch;
        }
    }
}

static void
out_ms(out_t *o, uint64_t us)
{
    out_fmt(o, "%llu.%03llu", (unsigned long long)(us / 1000), (unsigned long long)(us % 1000));
}

/* The time of the line, cached per thread per second. */
static const char *
log_time(bool json)
{
    static __thread time_t last[2] = {-1, -1};
    static __thread char text[2][40];
    time_t now = time(NULL);
    if (now != last[json]) {
        struct tm tm;
        last[json] = now;
        if (json) {
            gmtime_r(&now, &tm);
            strftime(text[1], sizeof(text[1]), "%Y-%m-%dT%H:%M:%SZ", &tm);
        } else {
            localtime_r(&now, &tm);
            strftime(text[0], sizeof(text[0]), "%d/%b/%Y:%H:%M:%S %z", &tm);
        }
    }
    return text[json];
}

void
gw_alog_request(const gw_config_t *cfg, const gw_req_t *req, const char *client, const gw_alog_rec_t *r)
{
    if (!cfg->log.access_on)
        return;
    bool json = cfg->log.access_format == GW_ALOG_JSON;
    char line[8192]; /* 4 fields of FIELD_MAX, short ones, the fixed text */
    out_t o = {line, line + sizeof(line) - 1}; /* room for the newline */
    size_t ref_len = 0, ua_len = 0;
    const char *ref = r->no_head ? NULL : gw_req_header(req, "Referer", &ref_len);
    const char *ua = r->no_head ? NULL : gw_req_header(req, "User-Agent", &ua_len);
    const char *method = llhttp_method_name((llhttp_method_t)req->method);
    const char *target = req->hbuf ? req->hbuf + req->url_off : "";
    size_t target_len = req->hbuf ? req->url_len : 0;
    uint64_t total = r->start_us ? gw_now_us() - r->start_us : 0;
    int status = r->status ? r->status : 499; /* nginx's "client closed request" */
    if (json) {
        out_str(&o, "{\"time\":\"");
        out_str(&o, log_time(true));
        out_str(&o, "\",\"client\":\"");
        out_esc(&o, client, strlen(client), true);
        if (r->no_head) {
            out_str(&o, "\",\"method\":null,\"target\":null,\"protocol\":null");
        } else {
            out_str(&o, "\",\"method\":\"");
            out_str(&o, method);
            out_str(&o, "\",\"target\":\"");
            out_esc(&o, target, target_len, true);
            out_fmt(&o, "\",\"protocol\":\"HTTP/%u.%u\"", req->http_major, req->http_minor);
        }
        out_fmt(&o, ",\"status\":%d,\"bytes\":%llu,\"referer\":\"", status, (unsigned long long)r->bytes);
        out_esc(&o, ref ? ref : "", ref_len, true);
        out_str(&o, "\",\"user_agent\":\"");
        out_esc(&o, ua ? ua : "", ua_len, true);
        out_str(&o, "\",\"request_id\":\"");
        out_esc(&o, req->request_id, strlen(req->request_id), true);
        out_str(&o, "\",\"route\":");
        if (r->route) {
            out_str(&o, "\"");
            out_esc(&o, r->route, strlen(r->route), true);
            out_str(&o, "\"");
        } else {
            out_str(&o, "null");
        }
        out_str(&o, ",\"total_ms\":");
        out_ms(&o, total);
        out_str(&o, ",\"upstream_ms\":");
        if (r->up_us >= 0)
            out_ms(&o, (uint64_t)r->up_us);
        else
            out_str(&o, "null");
        out_str(&o, ",\"failed\":[");
        const char *f = r->fail;
        for (bool first = true; *f; first = false) { /* "call:code,call:code" (names are [A-Za-z0-9_-]) */
            const char *colon = strchr(f, ':');
            const char *comma = strchr(f, ',');
            if (colon == NULL)
                break;
            if (comma == NULL)
                comma = f + strlen(f);
            out_str(&o, first ? "{\"call\":\"" : ",{\"call\":\"");
            out_esc(&o, f, (size_t)(colon - f), true);
            out_str(&o, "\",\"code\":\"");
            out_esc(&o, colon + 1, (size_t)(comma - colon - 1), true);
            out_str(&o, "\"}");
            f = *comma ? comma + 1 : comma;
        }
        out_str(&o, "]}");
    } else {
        out_esc(&o, client, strlen(client), false);
        out_str(&o, " - - [");
        out_str(&o, log_time(false));
        out_str(&o, "] \"");
        if (r->no_head) {
            out_str(&o, "-");
        } else {
            out_str(&o, method);
            out_str(&o, " ");
            out_esc(&o, target, target_len, false);
            out_fmt(&o, " HTTP/%u.%u", req->http_major, req->http_minor);
        }
        out_fmt(&o, "\" %d %llu \"", status, (unsigned long long)r->bytes);
        if (ref)
            out_esc(&o, ref, ref_len, false);
        else
            out_str(&o, "-");
        out_str(&o, "\" \"");
        if (ua)
            out_esc(&o, ua, ua_len, false);
        else
            out_str(&o, "-");
        out_str(&o, "\" rid=");
        out_esc(&o, req->request_id[0] ? req->request_id : "-", req->request_id[0] ? strlen(req->request_id) : 1,
                false);
        out_str(&o, " route=");
        if (r->route)
            out_esc(&o, r->route, strlen(r->route), false);
        else
            out_str(&o, "-");
        out_str(&o, " t=");
        out_ms(&o, total);
        out_str(&o, " up=");
        if (r->up_us >= 0)
            out_ms(&o, (uint64_t)r->up_us);
        else
            out_str(&o, "-");
        out_str(&o, " fail=");
        out_str(&o, r->fail_len ? r->fail : "-");
    }
    *o.p++ = '\n';
    queue_line(S_ACCESS, line, (size_t)(o.p - line));
}

/* --- the writer ---------------------------------------------------------- */

static int
open_log(const char *path, char *err, size_t errlen)
{
    int fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0)
        snprintf(err, errlen, "cannot open log file %s: %s", path, strerror(errno));
    return fd;
}

/* Writer: moves fds[] to want_path[] (reopening files that stay). */
static void
writer_reopen(void)
{
    char *paths[S_N];
    bool access_on;
    pthread_mutex_lock(&ctl_mu);
    for (int s = 0; s < S_N; s++)
        paths[s] = want_path[s] ? gw_strdup(want_path[s]) : NULL;
    access_on = want_access;
    pthread_mutex_unlock(&ctl_mu);
    int failed = 0;
    for (int s = 0; s < S_N; s++) {
        int fd = s == S_ACCESS && !access_on ? -1 : 2;
        if (paths[s]) {
            char err[512];
            fd = open_log(paths[s], err, sizeof(err));
            if (fd < 0) {
                /* keep the previous file; say so where it is seen */
                char line[600];
                int n = snprintf(line, sizeof(line), "gatherd: %s; still writing to the previous one\n", err);
                if (fds[S_ERROR] >= 0 && write(fds[S_ERROR], line, (size_t)n) < 0) {
                    /* nowhere left to report it */
                }
                free(paths[s]);
                failed++;
                continue;
            }
        }
        if (fds[s] > 2)
            close(fds[s]);
        fds[s] = fd;
        free(cur_path[s]);
        cur_path[s] = paths[s];
    }
    gw_log(failed ? GW_LOG_WARN : GW_LOG_NOTICE, "log files %s: access log %s, error log %s",
           failed ? "NOT all reopened (see the line above; a file that could not be opened keeps its previous one)"
                  : "reopened",
           cur_path[S_ACCESS]  ? cur_path[S_ACCESS]
           : fds[S_ACCESS] < 0 ? "off"
                               : "stderr",
           cur_path[S_ERROR] ? cur_path[S_ERROR] : "stderr");
}

static void
write_all(int fd, const char *p, size_t n)
{
    while (n > 0 && fd >= 0) {
        ssize_t k = write(fd, p, n);
        if (k < 0 && errno == EINTR)
            continue;
        if (k <= 0)
            return; /* disk full or gone: the lines are lost, the gateway goes on */
        p += k;
        n -= (size_t)k;
    }
}

/* Writer: every thread's buffers to their files. */
static void
writer_flush(char *spare[S_N])
{
    uint64_t dropped[S_N] = {0, 0};
    pthread_mutex_lock(&reg_mu);
    tbuf_t *list = tbufs;
    pthread_mutex_unlock(&reg_mu); /* entries are only ever added at the head */
    for (tbuf_t *t = list; t; t = t->next) {
        for (int s = 0; s < S_N; s++) {
            pthread_mutex_lock(&t->mu);
            char *d = t->data[s];
            size_t n = t->len[s];
            t->data[s] = spare[s];
            t->len[s] = 0;
            dropped[s] += t->dropped[s];
            t->dropped[s] = 0;
            pthread_mutex_unlock(&t->mu);
            spare[s] = d;
            write_all(fds[s], d, n);
        }
    }
    if (dropped[S_ACCESS] || dropped[S_ERROR])
        gw_log(GW_LOG_WARN, "log buffers full: %llu access log lines and %llu error log lines dropped",
               (unsigned long long)dropped[S_ACCESS], (unsigned long long)dropped[S_ERROR]);
}

static void *
writer_main(void *arg)
{
    GW_UNUSED(arg);
    gw_log_set_thread("log");
    char *spare[S_N];
    for (int s = 0; s < S_N; s++)
        spare[s] = gw_malloc(GW_ALOG_BUF_BYTES);
    for (;;) {
        pthread_mutex_lock(&ctl_mu);
        if (!ctl_stop && !ctl_kick && !ctl_reopen) {
            struct timespec until;
            clock_gettime(CLOCK_REALTIME, &until);
            until.tv_nsec += 100 * 1000 * 1000;
            if (until.tv_nsec >= 1000000000) {
                until.tv_sec++;
                until.tv_nsec -= 1000000000;
            }
            pthread_cond_timedwait(&ctl_cond, &ctl_mu, &until);
        }
        bool stop = ctl_stop, reopen = ctl_reopen;
        uint64_t asked = sync_asked; /* its lines were queued before it asked: this flush takes them */
        ctl_kick = ctl_reopen = false;
        pthread_mutex_unlock(&ctl_mu);
        gw_log_rl_flush(stop); /* summaries of rate-limited lines whose second is over (all at the end) */
        writer_flush(spare); /* lines queued before a reopen go to the old file */
        if (reopen)
            writer_reopen();
        if (asked != sync_done) {
            pthread_mutex_lock(&ctl_mu);
            sync_done = asked;
            pthread_cond_broadcast(&synced_cond);
            pthread_mutex_unlock(&ctl_mu);
        }
        if (stop) {
            writer_flush(spare); /* the writer's own last lines */
            break;
        }
    }
    for (int s = 0; s < S_N; s++)
        free(spare[s]);
    return NULL;
}

static void
set_wanted(const gw_config_t *cfg)
{
    pthread_mutex_lock(&ctl_mu);
    free(want_path[S_ACCESS]);
    free(want_path[S_ERROR]);
    want_access = cfg->log.access_on;
    want_path[S_ACCESS] = cfg->log.access_path ? gw_strdup(cfg->log.access_path) : NULL;
    want_path[S_ERROR] = cfg->log.error_path ? gw_strdup(cfg->log.error_path) : NULL;
    pthread_mutex_unlock(&ctl_mu);
}

int
gw_alog_start(const gw_config_t *cfg, char *err, size_t errlen)
{
    int fd[S_N] = {cfg->log.access_on ? 2 : -1, 2};
    const char *paths[S_N] = {cfg->log.access_path, cfg->log.error_path};
    for (int s = 0; s < S_N; s++) {
        if (paths[s] && (fd[s] = open_log(paths[s], err, errlen)) < 0) {
            if (s == S_ERROR && fd[S_ACCESS] > 2)
                close(fd[S_ACCESS]);
            return GW_ERR;
        }
    }
    for (int s = 0; s < S_N; s++) {
        fds[s] = fd[s];
        cur_path[s] = paths[s] ? gw_strdup(paths[s]) : NULL;
    }
    set_wanted(cfg);
    ctl_stop = ctl_kick = ctl_reopen = false;
    /* The writer takes no signal: a process-directed SIGHUP or SIGUSR1
     * delivered to it would kill the process instead of reaching the main
     * thread's sigtimedwait(). It is created with all of them blocked. */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int rc = pthread_create(&writer, NULL, writer_main, NULL);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc != 0) {
        snprintf(err, errlen, "cannot start the log writer thread: %s", strerror(rc));
        for (int s = 0; s < S_N; s++)
            if (fds[s] > 2)
                close(fds[s]);
        return GW_ERR;
    }
    running = true;
    /* Every error line goes through the writer from now on, also when the
     * error log is stderr: a worker never blocks on a pipe or terminal that
     * nobody reads (the writer does, alone; the workers' lines wait in their
     * buffers and beyond them are dropped and counted). */
    __atomic_store_n(&err_to_file, 1, __ATOMIC_RELEASE);
    return GW_OK;
}

void
gw_alog_apply(const gw_config_t *cfg)
{
    if (!running)
        return;
    set_wanted(cfg);
    gw_alog_reopen();
}

void
gw_alog_sync(int timeout_ms)
{
    if (!running)
        return;
    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_sec += timeout_ms / 1000;
    until.tv_nsec += (long)(timeout_ms % 1000) * 1000000;
    if (until.tv_nsec >= 1000000000) {
        until.tv_sec++;
        until.tv_nsec -= 1000000000;
    }
    pthread_mutex_lock(&ctl_mu);
    uint64_t mine = ++sync_asked;
    ctl_kick = true;
    pthread_cond_signal(&ctl_cond);
    while (sync_done < mine && pthread_cond_timedwait(&synced_cond, &ctl_mu, &until) == 0)
        ;
    pthread_mutex_unlock(&ctl_mu);
}

void
gw_alog_reopen(void)
{
    pthread_mutex_lock(&ctl_mu);
    ctl_reopen = true;
    pthread_cond_signal(&ctl_cond);
    pthread_mutex_unlock(&ctl_mu);
}

void
gw_alog_stop(void)
{
    if (!running)
        return;
    pthread_mutex_lock(&ctl_mu);
    ctl_stop = true;
    pthread_cond_signal(&ctl_cond);
    pthread_mutex_unlock(&ctl_mu);
    pthread_join(writer, NULL);
    running = false;
    __atomic_store_n(&err_to_file, 0, __ATOMIC_RELEASE);
    /* lines queued after the writer's last flush: written here, in order */
    for (tbuf_t *t = tbufs; t; t = t->next)
        for (int s = 0; s < S_N; s++)
            write_all(fds[s], t->data[s], t->len[s]);
    for (int s = 0; s < S_N; s++) {
        if (fds[s] > 2)
            close(fds[s]);
        fds[s] = s == S_ERROR ? 2 : -1;
        free(cur_path[s]);
        cur_path[s] = NULL;
        free(want_path[s]);
        want_path[s] = NULL;
    }
    while (tbufs) {
        tbuf_t *t = tbufs;
        tbufs = t->next;
        for (int s = 0; s < S_N; s++)
            free(t->data[s]);
        pthread_mutex_destroy(&t->mu);
        free(t);
    }
    my_tbuf = NULL;
}
