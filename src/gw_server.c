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
#include "gw_http.h"
#include "gw_log.h"
#include "gw_upstream.h"

#include <errno.h>
#include <event2/listener.h>
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

static evutil_socket_t
open_listener(const gw_listen_t *l, bool reuseport, char *err, size_t errlen)
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
    if (reuseport && listen(fd, LISTEN_BACKLOG) != 0) {
        snprintf(err, errlen, "listen() on %s failed: %s", l->text, strerror(errno));
        close(fd);
        return -1;
    }
    return fd;
}

static void
accept_cb(struct evconnlistener *lev, evutil_socket_t fd, struct sockaddr *sa, int salen, void *arg)
{
    gw_worker_t *w = arg;
    GW_UNUSED(lev);
    unsigned n = __atomic_add_fetch(&w->srv->conns, 1, __ATOMIC_RELAXED);
    if (n > w->cfg->max_connections) {
        __atomic_sub_fetch(&w->srv->conns, 1, __ATOMIC_RELAXED);
        /* Once a second per worker: a connection storm must not flood the log. */
        time_t now = time(NULL);
        w->refused++;
        if (now != w->refused_logged_at) {
            gw_log(GW_LOG_WARN, "max_connections (%u) reached; refused %u connection(s) since the last report",
                   w->cfg->max_connections, w->refused);
            w->refused_logged_at = now;
            w->refused = 0;
        }
        /* Answered without reading the request: one best-effort send. */
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
        evconnlistener_enable(w->listeners[i]);
}

static void
accept_error_cb(struct evconnlistener *lev, void *arg)
{
    gw_worker_t *w = arg;
    int err = EVUTIL_SOCKET_ERROR();
    GW_UNUSED(lev);
    gw_log(GW_LOG_ERR, "accept() failed: %s; pausing accepts for %d ms", strerror(err), ACCEPT_BACKOFF_MS);
    for (size_t i = 0; i < w->nlisteners; i++)
        evconnlistener_disable(w->listeners[i]);
    struct timeval tv = { 0, ACCEPT_BACKOFF_MS * 1000 };
    evtimer_add(w->accept_timer, &tv);
}

static void
close_listeners(gw_worker_t *w)
{
    for (size_t i = 0; i < w->nlisteners; i++)
        if (w->listeners[i])
            evconnlistener_free(w->listeners[i]);
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

static void
stop_cb(evutil_socket_t fd, short what, void *arg)
{
    gw_worker_t *w = arg;
    uint64_t v;
    GW_UNUSED(what);
    if (read(fd, &v, sizeof(v)) < 0) {
        /* EAGAIN: a second wake-up for the same request */
    }
    bool force = __atomic_load_n(&w->force, __ATOMIC_ACQUIRE);
    if (w->stopping && !force)
        return;
    if (force) {
        force_cb(-1, 0, w);
        return;
    }
    w->stopping = true;
    close_listeners(w);
    evtimer_del(w->accept_timer);
    gw_conn_t *c = w->conns;
    while (c) {
        gw_conn_t *next = gw_conn_next(c);
        gw_conn_shutdown(c);
        c = next;
    }
    if (w->nconns == 0) {
        event_base_loopexit(w->base, NULL);
        return;
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
    if (w->stopping && w->nconns == 0)
        event_base_loopexit(w->base, NULL);
}

static void *
worker_main(void *arg)
{
    gw_worker_t *w = arg;
    char tag[16];
    snprintf(tag, sizeof(tag), "w%d", w->id);
    gw_log_set_thread(tag);
    event_base_dispatch(w->base);
    close_listeners(w);
    close_all(w);
    gw_proxy_worker_free(w);
    gw_agg_worker_free(w);
    gw_upstream_pools_free(w);
    gw_dns_free(w->dns); /* after the pools: their queries are cancelled by then */
    w->dns = NULL;
    __atomic_store_n(&w->exited, 1, __ATOMIC_RELEASE);
    return NULL;
}

int
gw_server_start(gw_server_t *s, gw_config_t *cfg, char *err, size_t errlen)
{
    memset(s, 0, sizeof(*s));
    s->cfg = gw_config_ref(cfg);
    for (size_t i = 0; i < cfg->nlisten; i++) {
        evutil_socket_t probe = open_listener(&cfg->listen[i], false, err, errlen);
        if (probe < 0)
            return GW_ERR;
        close(probe);
    }
    s->nworkers = cfg->workers;
    s->workers = gw_calloc((size_t)s->nworkers, sizeof(gw_worker_t));
    for (int i = 0; i < s->nworkers; i++)
        s->workers[i].stop_fd = -1;
    for (int i = 0; i < s->nworkers; i++) {
        gw_worker_t *w = &s->workers[i];
        w->srv = s;
        w->id = i;
        w->cfg = gw_config_ref(cfg);
        w->fds = gw_calloc(cfg->nlisten, sizeof(evutil_socket_t));
        for (size_t k = 0; k < cfg->nlisten; k++)
            w->fds[k] = -1;
        w->listeners = gw_calloc(cfg->nlisten, sizeof(struct evconnlistener *));
        for (size_t k = 0; k < cfg->nlisten; k++) {
            w->fds[k] = open_listener(&cfg->listen[k], true, err, errlen);
            if (w->fds[k] < 0)
                return GW_ERR;
        }
        /* No locks: only this worker's thread touches its base; the main
         * thread talks to it through stop_fd. */
        struct event_config *ec = event_config_new();
        event_config_set_flag(ec, EVENT_BASE_FLAG_NOLOCK);
        w->base = event_base_new_with_config(ec);
        event_config_free(ec);
        if (w->base == NULL) {
            snprintf(err, errlen, "cannot create an event loop");
            return GW_ERR;
        }
        w->stop_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
        if (w->stop_fd < 0) {
            snprintf(err, errlen, "eventfd: %s", strerror(errno));
            return GW_ERR;
        }
        /* The resolver reads resolv.conf and the hosts file here, on the
         * main thread, before the worker runs: never on its loop. */
        if (cfg->nnamed > 0 && (w->dns = gw_dns_new(w->base, cfg, i, err, errlen)) == NULL)
            return GW_ERR;
        gw_upstream_pools_init(w);
        w->stop_ev = event_new(w->base, w->stop_fd, EV_READ | EV_PERSIST, stop_cb, w);
        event_add(w->stop_ev, NULL);
        const int ms[GW_T_MAX] = { [GW_T_HEADER] = cfg->http.client_header_timeout_ms,
                                   [GW_T_BODY] = cfg->http.client_body_timeout_ms,
                                   [GW_T_KEEPALIVE] = cfg->http.keepalive_timeout_ms,
                                   [GW_T_LINGER] = cfg->http.lingering_timeout_ms,
                                   [GW_T_SEND] = cfg->http.send_timeout_ms };
        for (int t = 1; t < GW_T_MAX; t++) {
            struct timeval tv = { ms[t] / 1000, (ms[t] % 1000) * 1000 };
            w->timeouts[t] = event_base_init_common_timeout(w->base, &tv);
        }
        w->accept_timer = evtimer_new(w->base, accept_resume_cb, w);
        w->force_timer = evtimer_new(w->base, force_cb, w);
        for (size_t k = 0; k < cfg->nlisten; k++) {
            w->listeners[k] = evconnlistener_new(w->base, accept_cb, w, LEV_OPT_CLOSE_ON_FREE | LEV_OPT_CLOSE_ON_EXEC,
                                                 -1, w->fds[k]);
            if (w->listeners[k] == NULL) {
                snprintf(err, errlen, "cannot watch the socket of %s", cfg->listen[k].text);
                return GW_ERR;
            }
            w->fds[k] = -1; /* owned by the listener now */
            w->nlisteners = k + 1;
            evconnlistener_set_error_cb(w->listeners[k], accept_error_cb);
        }
    }
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

void
gw_server_stop(gw_server_t *s, bool force)
{
    for (int i = 0; i < s->nworkers; i++) {
        gw_worker_t *w = &s->workers[i];
        if (w->stop_fd < 0)
            continue;
        if (force)
            __atomic_store_n(&w->force, true, __ATOMIC_RELEASE);
        uint64_t one = 1;
        if (write(w->stop_fd, &one, sizeof(one)) < 0)
            gw_log(GW_LOG_ERR, "cannot wake worker %d: %s", i, strerror(errno));
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
    if (s->workers) {
        for (int i = 0; i < s->nworkers; i++) {
            gw_worker_t *w = &s->workers[i];
            close_listeners(w);
            if (w->fds)
                for (size_t k = 0; k < s->cfg->nlisten; k++)
                    if (w->fds[k] >= 0)
                        close(w->fds[k]);
            free(w->fds);
            free(w->listeners);
            if (w->stop_ev)
                event_free(w->stop_ev);
            if (w->stop_fd >= 0)
                close(w->stop_fd);
            if (w->accept_timer)
                event_free(w->accept_timer);
            if (w->force_timer)
                event_free(w->force_timer);
            gw_upstream_pools_free(w); /* a worker that never ran still has them */
            gw_dns_free(w->dns);
            w->dns = NULL;
            if (w->base)
                event_base_free(w->base);
            gw_config_unref(w->cfg);
        }
        free(s->workers);
    }
    gw_config_unref(s->cfg);
    memset(s, 0, sizeof(*s));
}
