/*
 * gw_server.c - listening sockets, worker threads and the graceful stop
 * (see gw_server.h).
 *
 * Start-up binds everything from the main thread first, so "address in
 * use" or "permission denied" is reported before the daemon claims to run.
 * Because every socket has SO_REUSEPORT, a second gatherd could silently
 * share a port with the first; a probe bind without SO_REUSEPORT catches
 * that.
 *
 * Accept errors such as EMFILE pause this worker's listeners for 100 ms
 * instead of spinning on a level-triggered readable socket (nginx does the
 * same).
 */
#include "gw_server.h"
#include "gw_proxy.h"
#include "gw_agg.h"
#include "gw_config.h"
#include "gw_conn.h"
#include "gw_dns.h"
#include "gw_fetch.h"
#include "gw_http.h"
#include "gw_log.h"
#include "gw_upstream.h"

#include <errno.h>
#include <event2/listener.h>
#include <malloc.h>
#include <fcntl.h>
#include <linux/filter.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define ACCEPT_BACKOFF_MS 100
#define LISTEN_BACKLOG 511

evutil_socket_t
gw_server_open_socket(const gw_listen_t *l, bool reuseport, bool listening, char *err, size_t errlen)
{
    int fd = socket(l->addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        snprintf(err, errlen, "socket() for %s failed: %s", l->text, strerror(errno));
        return -1;
    }
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (reuseport && setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one)) != 0) {
        snprintf(err, errlen, "SO_REUSEPORT on %s failed: %s", l->text, strerror(errno));
        close(fd);
        return -1;
    }
    if (l->addr.ss_family == AF_INET6)
        setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof(one));
    if (bind(fd, (const struct sockaddr *)&l->addr, l->addrlen) != 0) {
        snprintf(err, errlen, "cannot listen on %s: %s", l->text, strerror(errno));
        close(fd);
        return -1;
    }
    if (listening && listen(fd, LISTEN_BACKLOG) != 0) {
        snprintf(err, errlen, "listen() on %s failed: %s", l->text, strerror(errno));
        close(fd);
        return -1;
    }
    return fd;
}

static void
wake(gw_worker_t *w)
{
    uint64_t one = 1;
    if (write(w->wake_fd, &one, sizeof(one)) < 0)
        gw_log(GW_LOG_ERR, "cannot wake worker %d: %s", w->id, strerror(errno));
}

/* Answers a connection refused at max_connections, without reading its
 * request (one best-effort send), closes it and gives its slot back. */
static void
refuse(gw_worker_t *w, evutil_socket_t fd)
{
    __atomic_sub_fetch(&w->srv->conns, 1, __ATOMIC_RELAXED);
    /* Once a second per worker: a connection storm must not flood the log. */
    time_t now = time(NULL);
    w->refused++;
    if (now != w->refused_logged_at) {
        gw_log(GW_LOG_WARN, "max_connections (%u) reached with no idle connection to close; refused %u "
               "connection(s) since the last report", w->cfg->max_connections, w->refused);
        w->refused_logged_at = now;
        w->refused = 0;
    }
    char id[33], msg[512];
    gw_http_new_request_id(id);
    static const char body_fmt[] = "{\"error\":{\"code\":\"too_many_connections\",\"message\":"
                                   "\"the gateway is at max_connections\",\"request_id\":\"%s\"}}";
    int blen = (int)sizeof(body_fmt) - 3 + 32;
    int len = snprintf(msg, sizeof(msg),
                       "HTTP/1.1 503 Service Unavailable\r\nDate: %s\r\nServer: gatherd\r\nX-Request-Id: %s\r\n"
                       "Content-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n"
                       "Retry-After: 1\r\n\r\n",
                       gw_http_date(), id, blen);
    len += snprintf(msg + len, sizeof(msg) - (size_t)len, body_fmt, id);
    if (send(fd, msg, (size_t)len, MSG_DONTWAIT | MSG_NOSIGNAL) < 0) {
        /* the client is refused either way */
    }
    shutdown(fd, SHUT_WR);
    close(fd);
}

/* At max_connections: closes this worker's oldest idle connection to make
 * room for fd (nginx's ngx_drain_connections). True when one was closed. */
static bool
drain_one(gw_worker_t *w)
{
    if (!gw_conn_drain_idle(w))
        return false;
    time_t now = time(NULL);
    w->drained++;
    if (now != w->drained_logged_at) {
        gw_log(GW_LOG_INFO, "max_connections (%u) reached; closed %u idle connection(s) for new ones since the "
               "last report", w->cfg->max_connections, w->drained);
        w->drained_logged_at = now;
        w->drained = 0;
    }
    return true;
}

/* The worker whose oldest idle connection has been idle longest (NULL:
 * none has one). Read without locks: a worker's idle list may change
 * meanwhile, which the worker settles when it takes a handed-over
 * connection (drain_one() there, or a refusal). */
static gw_worker_t *
oldest_idle_worker(gw_server_t *s)
{
    gw_worker_t *best = NULL;
    uint64_t oldest = UINT64_MAX;
    for (int i = 0; i < s->nworkers; i++) {
        gw_worker_t *w = &s->workers[i];
        uint64_t t = __atomic_load_n(&w->idle_oldest_us, __ATOMIC_RELAXED);
        if (t != 0 && t < oldest && !__atomic_load_n(&w->stop, __ATOMIC_ACQUIRE)) {
            best = w;
            oldest = t;
        }
    }
    return best;
}

/* Passes fd, accepted past max_connections, to worker t, which closes its
 * oldest idle connection for it (or refuses fd when none is left by then).
 * The slot fd holds in the count goes with it, so the count never passes
 * the limit. False when t's queue is full. */
static bool
hand_off(gw_worker_t *t, evutil_socket_t fd, const struct sockaddr *sa, int salen)
{
    if (salen < 0 || (size_t)salen > sizeof(struct sockaddr_storage))
        return false;
    bool queued = false;
    pthread_mutex_lock(&t->mail_mtx);
    if (t->nhandoff < GW_HANDOFF_MAX) {
        gw_handoff_t *h = &t->handoff[t->nhandoff++];
        h->fd = fd;
        memcpy(&h->addr, sa, (size_t)salen);
        h->addrlen = salen;
        queued = true;
    }
    pthread_mutex_unlock(&t->mail_mtx);
    if (queued)
        wake(t);
    return queued;
}

/* Takes the connections other workers handed to w (its thread). */
static void
take_handoffs(gw_worker_t *w)
{
    gw_handoff_t got[GW_HANDOFF_MAX];
    pthread_mutex_lock(&w->mail_mtx);
    unsigned n = w->nhandoff;
    memcpy(got, w->handoff, n * sizeof(gw_handoff_t));
    w->nhandoff = 0;
    pthread_mutex_unlock(&w->mail_mtx);
    for (unsigned i = 0; i < n; i++) {
        if (!w->stopping && drain_one(w)) {
            gw_log(GW_LOG_DEBUG, "took a connection another worker accepted at max_connections");
            gw_conn_accept(w, got[i].fd, (const struct sockaddr *)&got[i].addr, got[i].addrlen);
        } else {
            refuse(w, got[i].fd);
        }
    }
}

static void
accept_cb(struct evconnlistener *lev, evutil_socket_t fd, struct sockaddr *sa, int salen, void *arg)
{
    gw_worker_t *w = arg;
    GW_UNUSED(lev);
    gw_m_add(&w->m->accepted, 1);
    unsigned n = __atomic_add_fetch(&w->srv->conns, 1, __ATOMIC_RELAXED);
    if (n > w->cfg->max_connections) {
        /* Past the limit, the connection idle longest (in any worker) goes
         * before a new client is refused. */
        gw_worker_t *t = oldest_idle_worker(w->srv);
        if (t == w && drain_one(w))
            gw_conn_accept(w, fd, sa, salen);
        else if (t == NULL || t == w || !hand_off(t, fd, sa, salen))
            refuse(w, fd);
        return;
    }
    gw_conn_accept(w, fd, sa, salen);
}

static void
accept_resume_cb(evutil_socket_t fd, short what, void *arg)
{
    gw_worker_t *w = arg;
    GW_UNUSED(fd);
    GW_UNUSED(what);
    if (w->stopping)
        return;
    for (size_t i = 0; i < w->nlisteners; i++)
        evconnlistener_enable(w->listeners[i].lev);
}

static void
accept_error_cb(struct evconnlistener *lev, void *arg)
{
    gw_worker_t *w = arg;
    int err = EVUTIL_SOCKET_ERROR();
    GW_UNUSED(lev);
    gw_log_rl(GW_LOG_ERR, "accept() failed: %s; pausing accepts for %d ms", strerror(err), ACCEPT_BACKOFF_MS);
    for (size_t i = 0; i < w->nlisteners; i++)
        evconnlistener_disable(w->listeners[i].lev);
    struct timeval tv = { 0, ACCEPT_BACKOFF_MS * 1000 };
    evtimer_add(w->accept_timer, &tv);
}

/* Watches fd (a listening socket of l) in w (not yet when disabled); the
 * listener owns fd from here on, also on failure. */
static int
listener_add(gw_worker_t *w, gw_listener_t *out, const gw_listen_t *l, evutil_socket_t fd, bool disabled)
{
    memset(out, 0, sizeof(*out));
    out->lev = evconnlistener_new(w->base, accept_cb, w,
                                  LEV_OPT_CLOSE_ON_FREE | LEV_OPT_CLOSE_ON_EXEC | (disabled ? LEV_OPT_DISABLED : 0), -1,
                                  fd);
    if (out->lev == NULL) {
        close(fd);
        return GW_ERR;
    }
    evconnlistener_set_error_cb(out->lev, accept_error_cb);
    memcpy(&out->addr, &l->addr, l->addrlen);
    out->addrlen = l->addrlen;
    return GW_OK;
}

static bool
same_addr(const struct sockaddr_storage *a, socklen_t alen, const struct sockaddr_storage *b, socklen_t blen)
{
    return alen == blen && memcmp(a, b, alen) == 0;
}

static void
close_listeners(gw_worker_t *w)
{
    for (size_t i = 0; i < w->nlisteners; i++)
        if (w->listeners[i].lev)
            evconnlistener_free(w->listeners[i].lev);
    free(w->listeners);
    w->listeners = NULL;
    w->nlisteners = 0;
}

static void
close_all(gw_worker_t *w)
{
    gw_conn_t *c = w->conns;
    while (c) {
        gw_conn_t *next = gw_conn_next(c);
        gw_conn_close(c);
        gw_conn_release(c);
        c = next;
    }
}

static void
force_cb(evutil_socket_t fd, short what, void *arg)
{
    gw_worker_t *w = arg;
    GW_UNUSED(fd);
    GW_UNUSED(what);
    if (w->nconns)
        gw_log(GW_LOG_WARN, "shutdown timeout: closing %u connection(s) still busy", w->nconns);
    close_all(w);
    event_base_loopexit(w->base, NULL);
}

/* --- generations --------------------------------------------------------- */

static void
set_timeouts(gw_worker_t *w, const gw_config_t *cfg)
{
    const int ms[GW_T_MAX] = { [GW_T_HEADER] = cfg->http.client_header_timeout_ms,
                               [GW_T_BODY] = cfg->http.client_body_timeout_ms,
                               [GW_T_KEEPALIVE] = cfg->http.keepalive_timeout_ms,
                               [GW_T_LINGER] = cfg->http.lingering_timeout_ms,
                               [GW_T_SEND] = cfg->http.send_timeout_ms,
                               [GW_T_DRAIN] = GW_MIN(GW_DRAIN_IDLE_MS, cfg->shutdown_timeout_ms),
                               [GW_T_GONE] = GW_GONE_POLL_MS };
    for (int t = 1; t < GW_T_MAX; t++) {
        struct timeval tv = { ms[t] / 1000, (ms[t] % 1000) * 1000 };
        w->timeout_tv[t] = tv;
        /* libevent allows 256 common timeouts per base; many reloads with
         * new values could use them up: then a plain timeout. */
        w->timeouts[t] = event_base_init_common_timeout(w->base, &tv);
        if (w->timeouts[t] == NULL)
            w->timeouts[t] = &w->timeout_tv[t];
    }
}

/* Makes cfg (a reference is taken) w's current generation. */
static void
gen_switch(gw_worker_t *w, gw_config_t *cfg)
{
    gw_gen_t *g = gw_calloc(1, sizeof(gw_gen_t));
    g->cfg = gw_config_ref(cfg);
    g->refs = 1;
    gw_upstream_pools_attach(w, cfg, w->gen ? w->gen->cfg : NULL);
    gw_gen_t *old = w->gen;
    w->gen = g;
    w->cfg = cfg;
    set_timeouts(w, cfg);
    if (old)
        gw_server_gen_unref(w, old);
}

gw_gen_t *
gw_server_gen_ref(gw_worker_t *w)
{
    w->gen->refs++;
    return w->gen;
}

void
gw_server_gen_unref(gw_worker_t *w, gw_gen_t *g)
{
    if (g == NULL || --g->refs > 0)
        return;
    gw_upstream_pools_detach(w, g->cfg);
    gw_config_unref(g->cfg);
    free(g);
}

/* Closes and frees fds: the sockets of the listen addresses a reload adds
 * (cfg->nlisten entries, -1 for kept addresses), when they are not used. */
static void
fds_discard(const gw_config_t *cfg, evutil_socket_t *fds)
{
    for (size_t k = 0; k < cfg->nlisten; k++)
        if (fds[k] >= 0)
            close(fds[k]);
    free(fds);
}

/* Drops what PREPARE made ready (ABORT, or the worker stops first). */
static void
prep_drop(gw_worker_t *w)
{
    if (w->prep_cfg == NULL)
        return;
    for (size_t k = 0; k < w->prep_cfg->nlisten; k++)
        if (w->prep_ls[k].lev)
            evconnlistener_free(w->prep_ls[k].lev);
    free(w->prep_ls);
    w->prep_ls = NULL;
    gw_dns_free(w->prep_dns);
    w->prep_dns = NULL;
    gw_config_unref(w->prep_cfg);
    w->prep_cfg = NULL;
}

/* PREPARE: makes ready what can fail on this worker, using none of it yet:
 * the resolver (when sys is given and w has none) and the listeners of the
 * added sockets fds (taken over, with cfg's reference). GW_ERR with the
 * reason in err: nothing kept. Reads no file (sys is parsed already). */
static int
prepare(gw_worker_t *w, gw_config_t *cfg, evutil_socket_t *fds, gw_dns_sys_t *sys, char *err, size_t errlen)
{
    prep_drop(w);
    w->prep_cfg = cfg;
    w->prep_ls = gw_calloc(cfg->nlisten ? cfg->nlisten : 1, sizeof(gw_listener_t));
    int rc = GW_OK;
    if (w->stopping) {
        snprintf(err, errlen, "the worker is stopping");
        rc = GW_ERR;
    } else if (sys != NULL && w->dns == NULL && (w->prep_dns = gw_dns_new(w->base, cfg, sys, w->id, err, errlen)) == NULL) {
        rc = GW_ERR;
    }
    for (size_t k = 0; k < cfg->nlisten; k++) {
        if (fds[k] < 0)
            continue;
        if (rc != GW_OK)
            close(fds[k]);
        else if (listener_add(w, &w->prep_ls[k], &cfg->listen[k], fds[k], true) != GW_OK) {
            snprintf(err, errlen, "cannot watch the socket of %s", cfg->listen[k].text);
            rc = GW_ERR;
        }
    }
    free(fds);
    if (rc != GW_OK)
        prep_drop(w);
    return rc;
}

/* COMMIT: the prepared configuration becomes w's: new requests start on
 * it, listeners follow its addresses. Cannot fail. */
static void
commit(gw_worker_t *w)
{
    gw_config_t *cfg = w->prep_cfg;
    if (cfg == NULL)
        return;
    if (w->stopping) { /* the stop came first: it keeps what it has */
        prep_drop(w);
        return;
    }
    if (w->prep_dns) {
        w->dns = w->prep_dns; /* before gen_switch: new pools resolve with it */
        w->prep_dns = NULL;
    }
    /* Listeners in the order of cfg: kept ones move, added ones start accepting. */
    gw_listener_t *ls = gw_calloc(cfg->nlisten ? cfg->nlisten : 1, sizeof(gw_listener_t));
    size_t n = 0;
    for (size_t k = 0; k < cfg->nlisten; k++) {
        const gw_listen_t *l = &cfg->listen[k];
        if (w->prep_ls[k].lev) {
            ls[n] = w->prep_ls[k];
            evconnlistener_enable(ls[n++].lev);
            continue;
        }
        for (size_t i = 0; i < w->nlisteners; i++)
            if (w->listeners[i].lev && same_addr(&w->listeners[i].addr, w->listeners[i].addrlen, &l->addr, l->addrlen)) {
                ls[n++] = w->listeners[i];
                w->listeners[i].lev = NULL;
                break;
            }
    }
    free(w->prep_ls);
    w->prep_ls = NULL;
    w->prep_cfg = NULL;
    close_listeners(w); /* those of removed addresses */
    w->listeners = ls;
    w->nlisteners = n;
    gen_switch(w, cfg);
    gw_config_unref(cfg); /* the generation has its own */
    /* Idle connections move now, so the old generation ends with its last request. */
    for (gw_conn_t *c = w->conns; c; c = gw_conn_next(c))
        gw_conn_adopt_gen(c);
}

/* Answers w's mailbox (gw_server_reload's two phases). */
static void
take_mail(gw_worker_t *w)
{
    pthread_mutex_lock(&w->mail_mtx);
    gw_mail_op_t op = w->mail_op;
    gw_config_t *cfg = w->mail_cfg;
    evutil_socket_t *fds = w->mail_fds;
    gw_dns_sys_t *sys = w->mail_sys;
    w->mail_cfg = NULL;
    w->mail_fds = NULL;
    w->mail_sys = NULL;
    pthread_mutex_unlock(&w->mail_mtx);
    if (cfg != NULL && op == GW_MAIL_PREPARE) {
        char err[sizeof(w->mail_err)];
        int rc = prepare(w, cfg, fds, sys, err, sizeof(err));
        pthread_mutex_lock(&w->mail_mtx);
        w->mail_status = rc;
        if (rc != GW_OK)
            memcpy(w->mail_err, err, sizeof(err));
        pthread_mutex_unlock(&w->mail_mtx);
    } else if (cfg != NULL) { /* aborted before this worker took it */
        fds_discard(cfg, fds);
        gw_config_unref(cfg);
    }
    gw_dns_sys_unref(sys);
    if (op == GW_MAIL_COMMIT)
        commit(w);
    else if (op == GW_MAIL_ABORT)
        prep_drop(w);
    if (op == GW_MAIL_COMMIT || op == GW_MAIL_ABORT) {
        pthread_mutex_lock(&w->mail_mtx);
        if (w->mail_op == op)
            w->mail_op = GW_MAIL_NONE; /* done: the main thread may go on */
        pthread_mutex_unlock(&w->mail_mtx);
    }
}

/* Accepts what the kernel completed on w's listeners and has not been
 * accepted yet: closing a listener resets those connections. */
static void
accept_backlog(gw_worker_t *w)
{
    for (size_t i = 0; i < w->nlisteners; i++) {
        evutil_socket_t lfd = evconnlistener_get_fd(w->listeners[i].lev);
        for (int n = 0; n < 4096; n++) {
            struct sockaddr_storage ss;
            socklen_t sl = sizeof(ss);
            int cfd = accept4(lfd, (struct sockaddr *)&ss, &sl, SOCK_NONBLOCK | SOCK_CLOEXEC);
            if (cfd < 0)
                break;
            accept_cb(w->listeners[i].lev, cfd, (struct sockaddr *)&ss, (int)sl, w);
        }
    }
}

/* The end of the stop's grace for handshakes in flight: what completed
 * is accepted, the listeners close. */
static void
listen_close_cb(evutil_socket_t fd, short what, void *arg)
{
    gw_worker_t *w = arg;
    GW_UNUSED(fd);
    GW_UNUSED(what);
    accept_backlog(w);
    close_listeners(w);
    if (w->nconns == 0)
        event_base_loopexit(w->base, NULL);
}

/* The graceful stop's first step. A listener closed while a client's
 * handshake is in flight resets a connection the client already counts as
 * open (its request then fails as a read error, not as a refusal it could
 * retry elsewhere). So each listener first drops new SYNs (a socket filter:
 * the client's retransmission a second later meets the closed port and is
 * refused), keeps completing the handshakes already begun for
 * GW_STOP_LISTEN_GRACE_MS while accepting, and only then closes. Without
 * the filter (not Linux, or refused) the listeners close at the same time. */
static void
stop_listening(gw_worker_t *w)
{
    static struct sock_filter drop_syn[] = {
        BPF_STMT(BPF_LD | BPF_B | BPF_ABS, 13),           /* the TCP header's flags byte */
        BPF_STMT(BPF_ALU | BPF_AND | BPF_K, 0x12),        /* SYN | ACK */
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, 0x02, 0, 1),  /* a SYN alone: a new handshake */
        BPF_STMT(BPF_RET | BPF_K, 0),                     /* dropped */
        BPF_STMT(BPF_RET | BPF_K, 0xffffffffu),           /* the rest passes */
    };
    static const struct sock_fprog prog = { sizeof(drop_syn) / sizeof(drop_syn[0]), drop_syn };
    evtimer_del(w->accept_timer);
    for (size_t i = 0; i < w->nlisteners; i++) {
        evutil_socket_t lfd = evconnlistener_get_fd(w->listeners[i].lev);
        if (setsockopt(lfd, SOL_SOCKET, SO_ATTACH_FILTER, &prog, sizeof(prog)) != 0)
            gw_log(GW_LOG_DEBUG, "stop: no SYN filter on a listener (%s): it closes at once", strerror(errno));
        evconnlistener_enable(w->listeners[i].lev); /* paused after EMFILE: accept what is left */
    }
    accept_backlog(w);
    int grace = GW_MIN(GW_STOP_LISTEN_GRACE_MS, w->cfg->shutdown_timeout_ms);
    struct timeval tv = { grace / 1000, (grace % 1000) * 1000 };
    evtimer_add(w->listen_close_timer, &tv);
}

static void
wake_cb(evutil_socket_t fd, short what, void *arg)
{
    gw_worker_t *w = arg;
    uint64_t v;
    GW_UNUSED(what);
    if (read(fd, &v, sizeof(v)) < 0) {
        /* EAGAIN: a second wake-up for the same request */
    }
    take_mail(w);
    take_handoffs(w);
    bool force = __atomic_load_n(&w->force, __ATOMIC_ACQUIRE);
    bool stop = __atomic_load_n(&w->stop, __ATOMIC_ACQUIRE);
    if (!stop || (w->stopping && !force))
        return;
    if (force) {
        force_cb(-1, 0, w);
        return;
    }
    w->stopping = true;
    stop_listening(w);
    gw_conn_t *c = w->conns;
    while (c) {
        gw_conn_t *next = gw_conn_next(c);
        gw_conn_shutdown(c);
        c = next;
    }
    int ms = w->cfg->shutdown_timeout_ms;
    struct timeval tv = { ms / 1000, (ms % 1000) * 1000 };
    evtimer_add(w->force_timer, &tv);
}

void
gw_server_conn_closed(gw_worker_t *w)
{
    w->nconns--;
    __atomic_sub_fetch(&w->srv->conns, 1, __ATOMIC_RELAXED);
    if (w->stopping && w->nconns == 0 && w->nlisteners == 0)
        event_base_loopexit(w->base, NULL);
}

/* Frees what a worker owns once its connections are gone (its thread, or
 * the main thread for a worker that never ran). */
static void
worker_cleanup(gw_worker_t *w)
{
    close_listeners(w);
    close_all(w);
    w->stopping = true;
    take_handoffs(w); /* refused: this worker serves nothing more */
    gw_fetch_worker_stop(w); /* the cache's requests (their waiters here were cancelled with their requests) */
    /* the jobs of the requests just cancelled come back and free what they held */
    gw_tport_free(w->tport);
    w->tport = NULL;
    gw_proxy_worker_free(w);
    gw_agg_worker_free(w);
    gw_fetch_worker_free(w);
    pthread_mutex_lock(&w->mail_mtx);
    if (w->mail_cfg) {
        fds_discard(w->mail_cfg, w->mail_fds);
        gw_config_unref(w->mail_cfg);
        w->mail_cfg = NULL;
        w->mail_fds = NULL;
    }
    gw_dns_sys_unref(w->mail_sys);
    w->mail_sys = NULL;
    pthread_mutex_unlock(&w->mail_mtx);
    prep_drop(w);
    gw_server_gen_unref(w, w->gen); /* the last reference: connections are gone */
    w->gen = NULL;
    gw_dns_free(w->dns); /* after the pools: their queries are cancelled by then */
    w->dns = NULL;
}

/* The calling thread's time on a CPU and waiting for one, in microseconds
 * (the kernel's schedstat of the thread, read through w->probe_fd); with
 * no schedstat, the thread's CPU time and no wait. */
static void
thread_times(gw_worker_t *w, uint64_t *run_us, uint64_t *wait_us)
{
    char buf[96];
    ssize_t n = w->probe_fd >= 0 ? pread(w->probe_fd, buf, sizeof(buf) - 1, 0) : -1;
    unsigned long long run = 0, wait = 0;
    if (n > 0) {
        buf[n] = '\0';
        if (sscanf(buf, "%llu %llu", &run, &wait) == 2) {
            *run_us = run / 1000u;
            *wait_us = wait / 1000u;
            return;
        }
    }
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    *run_us = (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
    *wait_us = 0;
}

static void probe_cb(evutil_socket_t fd, short what, void *arg);

static void
probe_arm(gw_worker_t *w)
{
    w->probe_due_us = gw_now_us() + GW_PROBE_MS * 1000u;
    thread_times(w, &w->probe_run_us, &w->probe_wait_us);
    struct timeval tv = { 0, GW_PROBE_MS * 1000 };
    evtimer_add(w->probe_ev, &tv);
}

/*
 * The loop-stall probe: a timer that should fire every GW_PROBE_MS. How
 * late it fires is the loop's lag: time the loop spent on work of its own
 * (a callback that ran long, a crowded turn) or waiting for a CPU. The
 * stall is the lag without the thread's waits for a CPU meanwhile, and no
 * more than the time it ran, so a busy machine does not pass for a slow
 * loop. Resolution: libevent's clock, a few milliseconds.
 */
static void
probe_cb(evutil_socket_t fd, short what, void *arg)
{
    gw_worker_t *w = arg;
    GW_UNUSED(fd);
    GW_UNUSED(what);
    uint64_t now = gw_now_us(), run, wait;
    thread_times(w, &run, &wait);
    uint64_t late = now > w->probe_due_us ? now - w->probe_due_us : 0;
    uint64_t waited = wait - w->probe_wait_us, ran = run - w->probe_run_us;
    uint64_t stall = GW_MIN(late > waited ? late - waited : 0, ran);
    gw_m_observe(&w->m->loop_stall, stall);
    if (stall > __atomic_load_n(&w->m->loop_stall_max_us, __ATOMIC_RELAXED))
        __atomic_store_n(&w->m->loop_stall_max_us, stall, __ATOMIC_RELAXED);
    if (late > __atomic_load_n(&w->m->loop_lag_max_us, __ATOMIC_RELAXED))
        __atomic_store_n(&w->m->loop_lag_max_us, late, __ATOMIC_RELAXED);
    probe_arm(w);
}

static void *
worker_main(void *arg)
{
    gw_worker_t *w = arg;
    char tag[16];
    snprintf(tag, sizeof(tag), "w%d", w->id);
    gw_log_set_thread(tag);
    w->probe_fd = open("/proc/thread-self/schedstat", O_RDONLY | O_CLOEXEC); /* -1: CPU time only */
    probe_arm(w);
    event_base_dispatch(w->base);
    worker_cleanup(w);
    __atomic_store_n(&w->exited, 1, __ATOMIC_RELEASE);
    return NULL;
}

/* The part of gw_server_start after the resolver's files were read (sys: NULL when no resolver is needed). */
static int
start_workers(gw_server_t *s, gw_config_t *cfg, gw_dns_sys_t *sys, char *err, size_t errlen)
{
#ifdef M_MMAP_THRESHOLD
    /* Buffers of 128 KiB and more (request bodies held whole) get mappings
     * of their own, given back to the system when freed. A fixed threshold
     * also stops glibc from raising it after the first such free, which
     * would put later big bodies in the heap, kept by the process after
     * the requests end. */
    mallopt(M_MMAP_THRESHOLD, 128 * 1024);
#endif
    for (size_t i = 0; i < cfg->nlisten; i++) {
        evutil_socket_t probe = gw_server_open_socket(&cfg->listen[i], false, false, err, errlen);
        if (probe < 0)
            return GW_ERR;
        close(probe);
    }
    s->nworkers = cfg->workers;
    s->workers = gw_calloc((size_t)s->nworkers, sizeof(gw_worker_t));
    gw_metrics_init(s->nworkers);
    gw_metrics_bind(cfg);
    if (gw_tpool_start(cfg->thread_pool.threads, cfg->thread_pool.max_queue, err, errlen) != GW_OK)
        return GW_ERR;
    for (int i = 0; i < s->nworkers; i++) {
        s->workers[i].wake_fd = -1;
        s->workers[i].probe_fd = -1;
        pthread_mutex_init(&s->workers[i].mail_mtx, NULL);
    }
    for (int i = 0; i < s->nworkers; i++) {
        gw_worker_t *w = &s->workers[i];
        w->srv = s;
        w->id = i;
        w->m = gw_metrics_worker(i);
        /* No locks: only this worker's thread touches its base; the main
         * thread talks to it through wake_fd and the mailbox. */
        struct event_config *ec = event_config_new();
        event_config_set_flag(ec, EVENT_BASE_FLAG_NOLOCK);
        w->base = event_base_new_with_config(ec);
        event_config_free(ec);
        if (w->base == NULL) {
            snprintf(err, errlen, "cannot create an event loop");
            return GW_ERR;
        }
        w->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
        if (w->wake_fd < 0) {
            snprintf(err, errlen, "eventfd: %s", strerror(errno));
            return GW_ERR;
        }
        /* Set up here, on the main thread, before the worker runs: never on its loop. */
        if (sys != NULL && (w->dns = gw_dns_new(w->base, cfg, sys, i, err, errlen)) == NULL)
            return GW_ERR;
        gen_switch(w, cfg);
        w->wake_ev = event_new(w->base, w->wake_fd, EV_READ | EV_PERSIST, wake_cb, w);
        event_add(w->wake_ev, NULL);
        w->tport = gw_tport_new(w->base);
        if (w->tport == NULL) {
            snprintf(err, errlen, "eventfd: %s", strerror(errno));
            return GW_ERR;
        }
        w->probe_ev = evtimer_new(w->base, probe_cb, w);
        w->accept_timer = evtimer_new(w->base, accept_resume_cb, w);
        w->force_timer = evtimer_new(w->base, force_cb, w);
        w->listen_close_timer = evtimer_new(w->base, listen_close_cb, w);
        w->listeners = gw_calloc(cfg->nlisten ? cfg->nlisten : 1, sizeof(gw_listener_t));
        for (size_t k = 0; k < cfg->nlisten; k++) {
            evutil_socket_t fd = gw_server_open_socket(&cfg->listen[k], true, true, err, errlen);
            if (fd < 0)
                return GW_ERR;
            if (listener_add(w, &w->listeners[k], &cfg->listen[k], fd, false) != GW_OK) {
                snprintf(err, errlen, "cannot watch the socket of %s", cfg->listen[k].text);
                return GW_ERR;
            }
            w->nlisteners = k + 1;
        }
    }
    return GW_OK;
}

int
gw_server_start(gw_server_t *s, gw_config_t *cfg, char *err, size_t errlen)
{
    memset(s, 0, sizeof(*s));
    s->cfg = gw_config_ref(cfg);
    gw_dns_sys_t *sys = NULL;
    /* The resolver's files are read once, here, for every worker. */
    if (cfg->nnamed > 0 && (sys = gw_dns_sys_load(cfg, NULL, err, errlen)) == NULL)
        return GW_ERR;
    int rc = start_workers(s, cfg, sys, err, errlen);
    if (rc == GW_OK && sys != NULL)
        s->dns_cfg = gw_config_ref(cfg);
    gw_dns_sys_unref(sys);
    return rc;
}

int
gw_server_run(gw_server_t *s, char *err, size_t errlen)
{
    for (int i = 0; i < s->nworkers; i++) {
        int rc = pthread_create(&s->workers[i].thread, NULL, worker_main, &s->workers[i]);
        if (rc != 0) {
            snprintf(err, errlen, "cannot start worker thread: %s", strerror(rc));
            return GW_ERR;
        }
        s->started = i + 1;
    }
    return GW_OK;
}

/* How long the main thread waits for the workers in each phase of a reload. */
#define RELOAD_WAIT_MS 5000

/* Waits (polling every ms, at most RELOAD_WAIT_MS) until every worker's
 * mailbox says done(w) under its lock; the id of the first that did not,
 * or -1. */
static int
wait_workers(gw_server_t *s, bool (*done)(const gw_worker_t *w))
{
    for (int tries = 0;; tries++) {
        int late = -1;
        for (int i = 0; i < s->nworkers && late < 0; i++) {
            pthread_mutex_lock(&s->workers[i].mail_mtx);
            if (!done(&s->workers[i]))
                late = i;
            pthread_mutex_unlock(&s->workers[i].mail_mtx);
        }
        if (late < 0 || tries == RELOAD_WAIT_MS)
            return late;
        struct timespec ms = { 0, 1000 * 1000 };
        nanosleep(&ms, NULL);
    }
}

static bool
mail_idle(const gw_worker_t *w)
{
    return w->mail_op == GW_MAIL_NONE;
}

static bool
mail_answered(const gw_worker_t *w)
{
    return w->mail_status != GW_AGAIN;
}

/* Posts op to every worker's mailbox (PREPARE: with cfg, fds[i] and sys). */
static void
post(gw_server_t *s, gw_mail_op_t op, gw_config_t *cfg, evutil_socket_t **fds, gw_dns_sys_t *sys)
{
    for (int i = 0; i < s->nworkers; i++) {
        gw_worker_t *w = &s->workers[i];
        pthread_mutex_lock(&w->mail_mtx);
        w->mail_op = op;
        if (op == GW_MAIL_PREPARE) {
            w->mail_cfg = gw_config_ref(cfg);
            w->mail_fds = fds[i];
            w->mail_sys = sys ? gw_dns_sys_ref(sys) : NULL;
            w->mail_status = GW_AGAIN;
        }
        pthread_mutex_unlock(&w->mail_mtx);
        wake(w);
    }
}

int
gw_server_reload(gw_server_t *s, gw_config_t *cfg, char *err, size_t errlen)
{
    if (cfg->workers != s->nworkers) {
        snprintf(err, errlen, "the configuration has %d workers, the daemon runs %d", cfg->workers, s->nworkers);
        return GW_ERR;
    }
    /* The previous reload must be over (its COMMIT or ABORT taken). */
    int late = wait_workers(s, mail_idle);
    if (late >= 0) {
        snprintf(err, errlen, "worker %d has not finished the previous reload after %d ms", late, RELOAD_WAIT_MS);
        return GW_ERR;
    }
    gw_metrics_bind(cfg); /* before any worker sees it */
    bool *added = gw_calloc(cfg->nlisten ? cfg->nlisten : 1, sizeof(bool));
    for (size_t k = 0; k < cfg->nlisten; k++) {
        added[k] = true;
        for (size_t i = 0; i < s->cfg->nlisten; i++)
            if (same_addr(&s->cfg->listen[i].addr, s->cfg->listen[i].addrlen, &cfg->listen[k].addr,
                          cfg->listen[k].addrlen))
                added[k] = false;
        if (added[k]) {
            evutil_socket_t probe = gw_server_open_socket(&cfg->listen[k], false, false, err, errlen);
            if (probe < 0) {
                free(added);
                return GW_ERR;
            }
            close(probe);
        }
    }
    evutil_socket_t **fds = gw_calloc((size_t)s->nworkers, sizeof(evutil_socket_t *));
    int rc = GW_OK;
    for (int i = 0; i < s->nworkers; i++) {
        fds[i] = gw_malloc((cfg->nlisten ? cfg->nlisten : 1) * sizeof(evutil_socket_t));
        for (size_t k = 0; k < cfg->nlisten; k++)
            fds[i][k] = -1;
        for (size_t k = 0; k < cfg->nlisten && rc == GW_OK; k++)
            if (added[k] && (fds[i][k] = gw_server_open_socket(&cfg->listen[k], true, true, err, errlen)) < 0)
                rc = GW_ERR;
    }
    free(added);
    /* The first backend with a host name: the resolver's files are read
     * here, once, for every worker (a running resolver is kept as it is). */
    gw_dns_sys_t *sys = NULL;
    if (rc == GW_OK && cfg->nnamed > 0 && s->dns_cfg == NULL && (sys = gw_dns_sys_load(cfg, NULL, err, errlen)) == NULL)
        rc = GW_ERR;
    if (rc != GW_OK) {
        for (int i = 0; i < s->nworkers; i++)
            fds_discard(cfg, fds[i]);
        free(fds);
        return GW_ERR;
    }
    post(s, GW_MAIL_PREPARE, cfg, fds, sys); /* the workers own fds[i] now */
    free(fds);
    late = wait_workers(s, mail_answered);
    int failed = late;
    for (int i = 0; i < s->nworkers && failed < 0; i++) {
        pthread_mutex_lock(&s->workers[i].mail_mtx);
        if (s->workers[i].mail_status == GW_ERR) {
            failed = i;
            snprintf(err, errlen, "worker %d: %s", i, s->workers[i].mail_err);
        }
        pthread_mutex_unlock(&s->workers[i].mail_mtx);
    }
    if (failed >= 0) {
        if (late >= 0)
            snprintf(err, errlen, "worker %d did not answer within %d ms", late, RELOAD_WAIT_MS);
        post(s, GW_MAIL_ABORT, NULL, NULL, NULL); /* every worker drops what it made ready */
        gw_dns_sys_unref(sys);
        return GW_ERR;
    }
    post(s, GW_MAIL_COMMIT, NULL, NULL, NULL);
    late = wait_workers(s, mail_idle);
    if (late >= 0) /* it switches when its loop runs again: it has everything ready */
        gw_log(GW_LOG_WARN, "reload: worker %d has not switched after %d ms (a stalled loop?)", late, RELOAD_WAIT_MS);
    if (sys != NULL)
        s->dns_cfg = gw_config_ref(cfg);
    gw_dns_sys_unref(sys);
    gw_config_unref(s->cfg);
    s->cfg = gw_config_ref(cfg);
    return GW_OK;
}

bool
gw_server_resolver_differs(const gw_server_t *s, const gw_config_t *cfg)
{
    return s->dns_cfg != NULL && !gw_dns_conf_same(&s->dns_cfg->resolver, &cfg->resolver);
}

void
gw_server_stop(gw_server_t *s, bool force)
{
    for (int i = 0; i < s->nworkers; i++) {
        gw_worker_t *w = &s->workers[i];
        if (w->wake_fd < 0)
            continue;
        if (force)
            __atomic_store_n(&w->force, true, __ATOMIC_RELEASE);
        __atomic_store_n(&w->stop, true, __ATOMIC_RELEASE);
        wake(w);
    }
}

bool
gw_server_done(gw_server_t *s)
{
    for (int i = 0; i < s->started; i++)
        if (!__atomic_load_n(&s->workers[i].exited, __ATOMIC_ACQUIRE))
            return false;
    return true;
}

void
gw_server_free(gw_server_t *s)
{
    for (int i = 0; i < s->started; i++)
        pthread_join(s->workers[i].thread, NULL);
    for (int i = 0; s->workers && i < s->nworkers; i++) /* handed over as a worker stopped */
        for (unsigned k = 0; k < s->workers[i].nhandoff; k++)
            close(s->workers[i].handoff[k].fd);
    if (s->workers) {
        for (int i = 0; i < s->nworkers; i++) {
            gw_worker_t *w = &s->workers[i];
            if (i >= s->started && w->base)
                worker_cleanup(w); /* a worker that never ran */
            if (w->wake_ev)
                event_free(w->wake_ev);
            if (w->wake_fd >= 0)
                close(w->wake_fd);
            if (w->accept_timer)
                event_free(w->accept_timer);
            if (w->force_timer)
                event_free(w->force_timer);
            if (w->listen_close_timer)
                event_free(w->listen_close_timer);
            if (w->probe_ev)
                event_free(w->probe_ev);
            if (w->probe_fd >= 0)
                close(w->probe_fd);
            if (w->base)
                event_base_free(w->base);
            pthread_mutex_destroy(&w->mail_mtx);
        }
        free(s->workers);
    }
    gw_tpool_stop(); /* after the workers: their jobs are all back */
    gw_config_unref(s->cfg);
    gw_config_unref(s->dns_cfg);
    gw_metrics_free();
    memset(s, 0, sizeof(*s));
}
