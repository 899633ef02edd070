/*
 * gw_upstream.c - backend connections and per-worker keep-alive pools (see
 * gw_upstream.h).
 *
 * Two kinds of connection share one interface. Plain TCP does its own
 * non-blocking I/O on the worker's event_base: connect, then a persistent
 * read event, writes straight from the output buffer, and a write event
 * armed only while connecting or while the socket is full. TLS runs on a
 * bufferevent_openssl, whose callbacks are relayed to the same caller
 * callbacks. Both use one timer: the connect timeout while connecting, the
 * idle timeout while pooled. A connection can be handed out, configured and
 * written to before it has an address: that is how it waits for a host
 * name's addresses.
 */
#include "gw_upstream.h"
#include "gw_cluster.h"
#include "gw_config.h"
#include "gw_dns.h"
#include "gw_log.h"
#include "gw_server.h"

#include <errno.h>
#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/bufferevent_ssl.h>
#include <event2/event.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

/* Bytes asked of one recv(): big bodies stream in fewer calls. */
#define READ_CHUNK 32768

/* Takes a waiting connection off its pool's list of waiters. */
static void
waiter_unlink(gw_upstream_t *u)
{
    gw_pool_t *pool = u->pool;
    if (u->prev)
        u->prev->next = u->next;
    else
        pool->waiters = u->next;
    if (u->next)
        u->next->prev = u->prev;
    u->prev = u->next = NULL;
    u->waiting = false;
    pool->nwaiting--;
}

/* Puts u on its pool's waiters (O(1): every waiter is served by the same
 * answer, so their order does not matter). */
static void
waiter_add(gw_upstream_t *u)
{
    gw_pool_t *pool = u->pool;
    u->waiting = true;
    u->prev = NULL;
    u->next = pool->waiters;
    if (pool->waiters)
        pool->waiters->prev = u;
    pool->waiters = u;
    pool->nwaiting++;
}

static void queue_notify(gw_pool_t *pool);

/* Gauge and counter updates for the metrics (gw_metrics.h): a connection
 * opened or closed (it is active, not idle, at both moments), one moving
 * between use and the idle list, a call joining or leaving the queue. */
static void
count_open(gw_pool_t *pool, int d)
{
    gw_m_gauge(&pool->m->active, d);
    gw_m_gauge(&pool->ms->open, d);
    if (d > 0)
        gw_m_add(&pool->m->opened, 1);
}

static void
count_idle(gw_pool_t *pool, int d)
{
    gw_m_gauge(&pool->m->idle, d);
    gw_m_gauge(&pool->m->active, -d);
    gw_m_gauge(&pool->ms->idle, d);
}

/* Closes u and frees it. A connect that failed (the caller marked u broken
 * before it was connected) makes the pool avoid that address for a while. */
static void pool_check_unused(gw_pool_t *pool);

static void
upstream_close(gw_upstream_t *u)
{
    if (u->waiting)
        waiter_unlink(u);
    if (u->pool->name && u->connecting && !u->connected && u->broken)
        gw_dns_name_mark_down(u->pool->name, u->addr_gen, u->addr_idx);
    gw_pool_t *pool = u->pool;
    pool->nopen--;
    count_open(pool, -1);
    if (u->bev) {
        SSL *ssl = bufferevent_openssl_get_ssl(u->bev);
        if (ssl && u->connected && !u->broken) {
            /* A connection that ended cleanly: without this, SSL_free() would
             * mark its session not resumable (no close_notify was exchanged). */
            SSL_set_shutdown(ssl, SSL_SENT_SHUTDOWN | SSL_RECEIVED_SHUTDOWN);
        }
        bufferevent_free(u->bev); /* closes the socket */
    } else {
        if (u->rev)
            event_free(u->rev);
        if (u->wev)
            event_free(u->wev);
        if (u->in)
            evbuffer_free(u->in);
        if (u->out)
            evbuffer_free(u->out);
        if (u->fd >= 0)
            close(u->fd);
    }
    event_free(u->timer);
    free(u);
    queue_notify(pool); /* a slot is free */
    pool_check_unused(pool);
}

/* Takes u off its pool's idle list, O(1) wherever it is: the idle timer and
 * a backend's EOF hit the least recently used ones, at the tail. */
static void
idle_unlink(gw_upstream_t *u)
{
    gw_pool_t *pool = u->pool;
    if (u->prev)
        u->prev->next = u->next;
    else
        pool->idle = u->next;
    if (u->next)
        u->next->prev = u->prev;
    else
        pool->idle_tail = u->prev;
    u->next = u->prev = NULL;
    if (pool->name) {
        if (u->aprev)
            u->aprev->anext = u->anext;
        else
            pool->aidle[u->addr_idx] = u->anext;
        if (u->anext)
            u->anext->aprev = u->aprev;
        u->anext = u->aprev = NULL;
    }
    u->idle = false;
    pool->nidle--;
    count_idle(pool, -1);
}

/* Puts u (connected, not idle) at the head of its pool's idle list, and of
 * its address's list for a host name (u->addr_idx current: addr_current()). */
static void
idle_push(gw_upstream_t *u)
{
    gw_pool_t *pool = u->pool;
    u->prev = NULL;
    u->next = pool->idle;
    if (pool->idle)
        pool->idle->prev = u;
    else
        pool->idle_tail = u;
    pool->idle = u;
    if (pool->name) {
        gw_upstream_t **head = &pool->aidle[u->addr_idx];
        u->aprev = NULL;
        u->anext = *head;
        if (*head)
            (*head)->aprev = u;
        *head = u;
    }
    u->idle = true;
    pool->nidle++;
    count_idle(pool, 1);
}

/*
 * A host-name pool whose name has new addresses (a new generation, from a
 * DNS answer or the hosts file): idle connections to an address the answer
 * no longer lists are closed, the others move to their address's new index,
 * in the same order. Nothing when the generation is the one indexed. The
 * pool is not freed here: its idle connections mean a configuration uses it.
 */
static void
idle_sync(gw_pool_t *pool)
{
    gw_dns_name_t *n = pool->name;
    if (pool->aidle_gen == n->gen)
        return;
    for (gw_upstream_t *u = pool->idle, *next; u; u = next) {
        next = u->next;
        if (gw_dns_name_has(n, (const struct sockaddr *)&u->sa, u->salen))
            continue;
        idle_unlink(u); /* from the old index, still in place */
        upstream_close(u);
    }
    free(pool->aidle);
    pool->aidle = n->naddrs ? gw_calloc(n->naddrs, sizeof(gw_upstream_t *)) : NULL;
    pool->naidle = n->naddrs;
    pool->aidle_gen = n->gen;
    for (gw_upstream_t *u = pool->idle_tail; u; u = u->prev) { /* oldest first: each list stays LIFO */
        gw_dns_name_find(n, (const struct sockaddr *)&u->sa, u->salen, &u->addr_idx);
        u->addr_gen = n->gen;
        gw_upstream_t **head = &pool->aidle[u->addr_idx];
        u->aprev = NULL;
        u->anext = *head;
        if (*head)
            (*head)->aprev = u;
        *head = u;
    }
}

/* Whether u, of a host-name pool, connects to one of the name's current
 * addresses; then u->addr_gen and u->addr_idx say which (the index of an
 * older generation is translated). */
static bool
addr_current(gw_upstream_t *u)
{
    gw_pool_t *pool = u->pool;
    idle_sync(pool);
    if (u->addr_gen == pool->name->gen)
        return true;
    if (!gw_dns_name_find(pool->name, (const struct sockaddr *)&u->sa, u->salen, &u->addr_idx))
        return false;
    u->addr_gen = pool->name->gen;
    return true;
}

/* An idle connection that heard from its backend (data, EOF, error) or
 * timed out: unusable, closed. */
static void
idle_drop(gw_upstream_t *u, const char *why)
{
    gw_log_debug("backend %s server %s: %s on an idle connection; closing it", u->pool->backend->name,
                 u->pool->srv->label, why);
    idle_unlink(u);
    upstream_close(u);
}

static void
emit(gw_upstream_t *u, int what)
{
    u->event_cb(u, what, u->arg);
}

/* --- plain TCP ----------------------------------------------------------- */

static void
plain_read_enable(gw_upstream_t *u, bool on)
{
    if (on == u->reading)
        return;
    u->reading = on;
    if (u->rev == NULL)
        return; /* not connected yet: plain_connect() registers it */
    if (on)
        event_add(u->rev, NULL);
    else
        event_del(u->rev);
}

/* Writes the output. GW_OK: all written; GW_AGAIN: the socket is full (the
 * write event is armed); GW_ERR: u->err says why. */
static int
plain_flush(gw_upstream_t *u)
{
    while (evbuffer_get_length(u->out) > 0) {
        int n = evbuffer_write(u->out, u->fd);
        if (n >= 0)
            continue;
        if (errno == EINTR)
            continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) {
            if (!u->writing) {
                u->writing = true;
                event_add(u->wev, NULL);
            }
            return GW_AGAIN;
        }
        u->err = errno;
        return GW_ERR;
    }
    if (u->writing) {
        u->writing = false;
        event_del(u->wev);
    }
    return GW_OK;
}

static void
plain_read_ev(evutil_socket_t fd, short what, void *arg)
{
    gw_upstream_t *u = arg;
    GW_UNUSED(what);
    if (u->idle) {
        idle_drop(u, "data or EOF");
        return;
    }
    struct evbuffer_iovec v;
    if (evbuffer_reserve_space(u->in, READ_CHUNK, &v, 1) < 1) {
        u->err = ENOMEM;
        emit(u, GW_UP_ERROR);
        return;
    }
    ssize_t n = recv(fd, v.iov_base, v.iov_len, 0);
    if (n > 0) {
        v.iov_len = (size_t)n;
        evbuffer_commit_space(u->in, &v, 1);
        u->read_cb(u, u->arg);
    } else if (n == 0) {
        plain_read_enable(u, false);
        emit(u, GW_UP_EOF);
    } else if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
        u->err = errno;
        plain_read_enable(u, false);
        emit(u, GW_UP_ERROR);
    }
}

static void
plain_write_ev(evutil_socket_t fd, short what, void *arg)
{
    gw_upstream_t *u = arg;
    GW_UNUSED(what);
    if (u->err) { /* a write error noticed by gw_upstream_send() */
        u->writing = false;
        event_del(u->wev);
        emit(u, GW_UP_ERROR);
        return;
    }
    if (!u->connected) {
        int err = u->connect_err;
        socklen_t len = sizeof(err);
        if (err == 0 && getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) != 0)
            err = errno;
        if (err) {
            u->err = err;
            u->writing = false;
            event_del(u->wev);
            emit(u, GW_UP_ERROR);
            return;
        }
        u->connected = true;
        evtimer_del(u->timer);
        if (plain_flush(u) == GW_ERR) {
            emit(u, GW_UP_ERROR);
            return;
        }
        emit(u, GW_UP_CONNECTED);
        return;
    }
    int rc = plain_flush(u);
    if (rc == GW_ERR)
        emit(u, GW_UP_ERROR);
    else if (evbuffer_get_length(u->out) <= u->low_water && u->drained_cb)
        u->drained_cb(u, u->arg);
}

/* Starts a non-blocking connect of u to sa. GW_ERR (errno set) when no
 * socket could be made or the connect failed at once. */
static int
plain_connect(gw_upstream_t *u, const struct sockaddr *sa, socklen_t salen)
{
    struct event_base *base = u->pool->w->base;
    u->fd = socket(sa->sa_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (u->fd < 0)
        return GW_ERR;
    int one = 1;
    setsockopt(u->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    int err = 0;
    if (connect(u->fd, sa, salen) != 0 && errno != EINPROGRESS) {
        /* Out of local ports or buffers is ours; any other error is the
         * address's (a refused loopback connect fails at once) and is
         * reported from the loop like one that fails later, so the caller
         * sees one kind of connect failure (and may try another server). */
        if (errno == EAGAIN || errno == EADDRNOTAVAIL || errno == ENOBUFS || errno == ENOMEM)
            return GW_ERR;
        err = errno;
    }
    /* Even a connect that completed (or failed) at once is reported from the
     * loop, once the caller has set its callbacks. */
    u->rev = event_new(base, u->fd, EV_READ | EV_PERSIST, plain_read_ev, u);
    u->wev = event_new(base, u->fd, EV_WRITE | EV_PERSIST, plain_write_ev, u);
    if (u->rev == NULL || u->wev == NULL) {
        gw_log_rl(GW_LOG_ERR, "backend %s: out of memory while connecting", u->pool->backend->name);
        abort(); /* our allocation policy: out of memory is fatal */
    }
    if (err) {
        u->connect_err = err; /* plain_write_ev reports it */
        event_active(u->wev, EV_WRITE, 1);
        return GW_OK;
    }
    if (u->reading)
        event_add(u->rev, NULL);
    u->writing = true;
    event_add(u->wev, NULL);
    return GW_OK;
}

/* --- TLS (bufferevent_openssl) -------------------------------------------- */

static int pool_ex_index = -1;
static pthread_once_t pool_ex_once = PTHREAD_ONCE_INIT;

static void
pool_ex_init(void)
{
    pool_ex_index = SSL_get_ex_new_index(0, NULL, NULL, NULL, NULL);
}

int
gw_upstream_tls_new_session(SSL *ssl, SSL_SESSION *sess)
{
    gw_pool_t *pool = SSL_get_ex_data(ssl, pool_ex_index);
    if (pool == NULL)
        return 0;
    if (pool->session)
        SSL_SESSION_free(pool->session);
    pool->session = sess; /* we keep the reference OpenSSL gives us */
    return 1;
}

bool
gw_upstream_tls_failed(gw_upstream_t *u)
{
    return u->bev && !u->connected && (bufferevent_get_openssl_error(u->bev) || u->err == 0);
}

const char *
gw_upstream_tls_error(gw_upstream_t *u, char *buf, size_t len)
{
    SSL *ssl = bufferevent_openssl_get_ssl(u->bev);
    long vr = ssl ? SSL_get_verify_result(ssl) : X509_V_OK;
    unsigned long e = bufferevent_get_openssl_error(u->bev);
    if (vr != X509_V_OK)
        snprintf(buf, len, "certificate verify failed: %s", X509_verify_cert_error_string(vr));
    else if (e)
        ERR_error_string_n(e, buf, len);
    else
        snprintf(buf, len, "connection closed during the TLS handshake");
    return buf;
}

static void
tls_read_cb(struct bufferevent *bev, void *arg)
{
    gw_upstream_t *u = arg;
    GW_UNUSED(bev);
    if (u->idle)
        idle_drop(u, "data");
    else
        u->read_cb(u, u->arg);
}

static void
tls_write_cb(struct bufferevent *bev, void *arg)
{
    gw_upstream_t *u = arg;
    GW_UNUSED(bev);
    if (!u->idle && u->drained_cb)
        u->drained_cb(u, u->arg);
}

static void
tls_event_cb(struct bufferevent *bev, short what, void *arg)
{
    gw_upstream_t *u = arg;
    GW_UNUSED(bev);
    if (u->idle) {
        idle_drop(u, "EOF or error");
        return;
    }
    if (what & BEV_EVENT_CONNECTED) {
        u->connected = true;
        evtimer_del(u->timer);
        emit(u, GW_UP_CONNECTED);
    } else if (what & BEV_EVENT_EOF) {
        emit(u, GW_UP_EOF);
    } else {
        u->err = EVUTIL_SOCKET_ERROR();
        emit(u, GW_UP_ERROR);
    }
}

/* The TLS side of u, before it has a socket: SNI and the certificate name
 * check come from tls.server_name (an IP address is checked against IP
 * SANs). */
static int
tls_new(gw_upstream_t *u, gw_worker_t *w, gw_pool_t *pool, const gw_backend_t *b)
{
    const gw_peer_t *srv = pool->srv;
    pthread_once(&pool_ex_once, pool_ex_init);
    SSL *ssl = SSL_new(b->ssl_ctx);
    if (ssl == NULL) {
        errno = ENOMEM;
        return GW_ERR;
    }
    SSL_set_ex_data(ssl, pool_ex_index, pool);
    if (srv->tls_name_is_ip) {
        if (b->tls_verify)
            X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(ssl), srv->tls_server_name);
    } else {
        SSL_set_tlsext_host_name(ssl, srv->tls_server_name);
        if (b->tls_verify)
            SSL_set1_host(ssl, srv->tls_server_name);
    }
    if (pool->session)
        SSL_set_session(ssl, pool->session);
    u->bev = bufferevent_openssl_socket_new(w->base, -1, ssl, BUFFEREVENT_SSL_CONNECTING, BEV_OPT_CLOSE_ON_FREE);
    if (u->bev == NULL) {
        SSL_free(ssl);
        errno = ENOMEM;
        return GW_ERR;
    }
    /* Many servers close without close_notify; a cut body is still caught
     * by the HTTP framing (Content-Length, chunked). */
    bufferevent_openssl_set_allow_dirty_shutdown(u->bev, 1);
    u->in = bufferevent_get_input(u->bev);
    u->out = bufferevent_get_output(u->bev);
    bufferevent_setcb(u->bev, tls_read_cb, tls_write_cb, tls_event_cb, u);
    return GW_OK;
}

/* Starts connecting the TLS connection u to sa. The relay callbacks are set
 * aside meanwhile: a connect that fails at once reports through the return
 * value, never through a callback into code still setting u up. */
static int
tls_connect(gw_upstream_t *u, const struct sockaddr *sa, socklen_t salen)
{
    bufferevent_setcb(u->bev, NULL, NULL, NULL, NULL);
    int rc = bufferevent_socket_connect(u->bev, sa, (int)salen);
    int err = errno;
    bufferevent_setcb(u->bev, tls_read_cb, tls_write_cb, tls_event_cb, u);
    if (rc != 0) {
        errno = err;
        return GW_ERR;
    }
    u->fd = bufferevent_getfd(u->bev);
    int one = 1;
    setsockopt(u->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    return GW_OK;
}

/* Starts connecting u to sa, with the backend's connect timeout. GW_ERR
 * with errno set when no socket could be made (not the address's fault). */
static int
start_connect(gw_upstream_t *u, const struct sockaddr *sa, socklen_t salen)
{
    const gw_backend_t *b = u->pool->backend;
    memcpy(&u->sa, sa, salen);
    u->salen = salen;
    int rc = u->bev ? tls_connect(u, sa, salen) : plain_connect(u, sa, salen);
    if (rc != GW_OK)
        return GW_ERR;
    u->connecting = true;
    struct timeval tv = { b->connect_timeout_ms / 1000, (b->connect_timeout_ms % 1000) * 1000 };
    evtimer_add(u->timer, &tv);
    return GW_OK;
}

/* Reports an error to the caller of u through its event callback. Only from
 * a loop callback of our own (the caller's callback may free u and its
 * client connection). */
static void
report_error(gw_upstream_t *u, int err)
{
    u->err = err;
    emit(u, GW_UP_ERROR);
}

/* Fails every waiter of pool marked resolve_failed. One at a time from the
 * head: each report may release connections of the pool. */
static void
fail_waiters(gw_pool_t *pool)
{
    for (;;) {
        gw_upstream_t *u = pool->waiters;
        while (u && !u->resolve_failed)
            u = u->next;
        if (u == NULL)
            return;
        waiter_unlink(u);
        report_error(u, 0);
    }
}

/* pool->fail_ev: failures found inside gw_upstream_get() are reported from
 * here, after the caller has installed its callbacks. */
static void
fail_ev_cb(evutil_socket_t fd, short what, void *arg)
{
    GW_UNUSED(fd);
    GW_UNUSED(what);
    fail_waiters(arg);
}

/* A query for the pool's host name ended: connect the waiters to the new
 * addresses or fail them, and retire idle connections to addresses the
 * answer no longer lists. */
static void
pool_resolved(gw_dns_name_t *n, void *arg)
{
    gw_pool_t *pool = arg;
    const gw_backend_t *b = pool->backend;
    char list[256];
    if (n->naddrs == 0 || n->err != 0) {
        gw_log_rl(GW_LOG_WARN, "backend %s server %s: cannot resolve %s: %s; %s%s, retrying in %d ms at the earliest",
               b->name, pool->srv->label, n->host, n->errtext, n->naddrs ? "keeping the last addresses: " : "no addresses",
               n->naddrs ? gw_dns_name_list(n, list, sizeof(list)) : "", n->ttl_ms);
    } else {
        gw_log_rl(GW_LOG_INFO, "backend %s server %s: %s is %s (for %d ms)", b->name, pool->srv->label, n->host,
               gw_dns_name_list(n, list, sizeof(list)), n->ttl_ms);
    }
    idle_sync(pool);
    if (n->naddrs == 0) {
        for (gw_upstream_t *u = pool->waiters; u; u = u->next)
            u->resolve_failed = true;
        fail_waiters(pool);
        return;
    }
    while (pool->waiters) {
        gw_upstream_t *u = pool->waiters;
        waiter_unlink(u);
        const gw_dns_addr_t *a;
        size_t idx;
        if (gw_dns_name_pick(n, &a, &idx) != GW_OK) {
            u->resolve_failed = true;
            report_error(u, 0);
            continue;
        }
        u->resolve_failed = false; /* one failed earlier (still queued on fail_ev) is served now */
        u->addr_gen = n->gen;
        u->addr_idx = idx;
        if (start_connect(u, (const struct sockaddr *)&a->sa, a->len) != GW_OK)
            report_error(u, errno);
    }
}

const char *
gw_upstream_resolve_error(const gw_upstream_t *u)
{
    const gw_dns_name_t *n = u->pool->name;
    return n && n->errtext[0] ? n->errtext : "unknown error";
}

/* --- the pool ------------------------------------------------------------ */

static void
timer_cb(evutil_socket_t fd, short what, void *arg)
{
    gw_upstream_t *u = arg;
    GW_UNUSED(fd);
    GW_UNUSED(what);
    if (u->idle)
        idle_drop(u, "idle_timeout_ms");
    else
        emit(u, GW_UP_TIMEOUT); /* only armed while connecting */
}

/* --- the wait queue (max_pending) ----------------------------------------- */

/* Whether gw_upstream_get() can give a connection now to a call of b (a
 * reload may have changed max_connections of a kept pool). */
static bool
pool_room_for(const gw_pool_t *pool, const gw_backend_t *b)
{
    return pool->idle != NULL || pool->nopen < b->max_connections;
}

/* ... to a call of the newest configuration. */
static bool
pool_has_room(const gw_pool_t *pool)
{
    return pool_room_for(pool, pool->backend);
}

/* A slot may have freed: serve the queue from the loop, never from inside
 * the caller that released or closed a connection. */
static void
queue_notify(gw_pool_t *pool)
{
    if (pool->qhead)
        event_active(pool->wake_ev, 0, 0);
}

/* wt's place k: the embedded one, then the allocated ones. */
static gw_upstream_qlink_t *
wait_link(gw_upstream_wait_t *wt, unsigned k)
{
    return k == 0 ? &wt->one : &wt->more[k - 1];
}

static void
queue_unlink(gw_upstream_qlink_t *l)
{
    gw_pool_t *pool = l->pool;
    if (l->prev)
        l->prev->next = l->next;
    else
        pool->qhead = l->next;
    if (l->next)
        l->next->prev = l->prev;
    else
        pool->qtail = l->prev;
    l->next = l->prev = NULL;
    l->pool = NULL;
    pool->nlinks--;
}

/* Arms the queue timer for the head's expiry. The timer is not moved when
 * the head leaves early: it then fires early and re-arms for the new head. */
static void
qtimer_arm(gw_pool_t *pool)
{
    if (pool->qhead == NULL)
        return;
    uint64_t now = gw_now_ms();
    uint64_t exp = pool->qhead->wt->expires_ms;
    uint64_t ms = exp > now ? exp - now : 0;
    struct timeval tv = { (time_t)(ms / 1000), (suseconds_t)((ms % 1000) * 1000) };
    evtimer_add(pool->qtimer, &tv);
}

/* The first place of pool's queue whose call may take a slot of this
 * server now: its server (of the call's configuration) is usable, and the
 * call's max_connections leaves room. Places that may not are passed
 * over, marked for this run (gen), and keep their turn for a later run:
 * the call waits on. Walks from the head each time, since a callback may
 * have cancelled any place. */
static gw_upstream_qlink_t *
queue_next(gw_pool_t *pool, unsigned gen, uint64_t now)
{
    for (gw_upstream_qlink_t *l = pool->qhead; l; l = l->next) {
        if (l->pass == gen)
            continue;
        const gw_backend_t *b = l->wt->b;
        if (pool_room_for(pool, b) && gw_cluster_usable(&b->servers[l->si], now))
            return l;
        l->pass = gen;
    }
    return NULL;
}

/* pool->wake_ev: hands free slots to the waiters, oldest first. Each
 * callback may release connections, cancel other waiters or queue new
 * ones, so the queue is read afresh each time; at most the places present
 * at the start are served in one run (a place queued meanwhile is marked
 * as passed, and a waiter that cannot take its slot and queues again
 * waits for the next run). A call served here leaves the queues of its
 * other servers too. */
static void
wake_cb(evutil_socket_t fd, short what, void *arg)
{
    gw_pool_t *pool = arg;
    GW_UNUSED(fd);
    GW_UNUSED(what);
    unsigned budget = pool->nlinks;
    unsigned gen = ++pool->wake_gen;
    uint64_t now = gw_now_ms();
    gw_upstream_qlink_t *l;
    pool->holds++; /* a callback may end the last request of the pool's last configuration */
    while (budget-- > 0 && pool_has_room(pool) && (l = queue_next(pool, gen, now)) != NULL) {
        gw_upstream_wait_t *wt = l->wt;
        wt->si = l->si;
        gw_upstream_wait_cancel(wt);
        pool->serving = true;
        wt->cb(wt, GW_OK, wt->arg);
        pool->serving = false;
    }
    if (pool_has_room(pool) && queue_next(pool, gen, now))
        event_active(pool->wake_ev, 0, 0);
    pool->holds--;
    pool_check_unused(pool);
}

/* pool->qtimer: fails the waiters whose queue_timeout_ms passed (the
 * oldest are at the head: they all wait the same time); each leaves the
 * queues of its other servers too, whose timers then fire early and re-arm.
 * Accepted: for a moment after a reload that changed queue_timeout_ms of a
 * backend whose pool is kept, waiters of both configurations share the
 * queue, and one with the shorter timeout behind one with the longer is
 * failed late, when the head leaves (still bounded by its call timeout and
 * deadline). */
static void
qtimer_cb(evutil_socket_t fd, short what, void *arg)
{
    gw_pool_t *pool = arg;
    GW_UNUSED(fd);
    GW_UNUSED(what);
    uint64_t now = gw_now_ms();
    unsigned budget = pool->nlinks;
    pool->holds++;
    while (budget-- > 0 && pool->qhead && pool->qhead->wt->expires_ms <= now) {
        gw_upstream_wait_t *wt = pool->qhead->wt;
        gw_upstream_wait_cancel(wt);
        wt->cb(wt, GW_AGAIN, wt->arg);
    }
    qtimer_arm(pool);
    pool->holds--;
    pool_check_unused(pool);
}

/* Appends wt's place l, for server si, to pool's queue. */
static void
queue_link(gw_pool_t *pool, gw_upstream_wait_t *wt, gw_upstream_qlink_t *l, unsigned si)
{
    l->pool = pool;
    l->wt = wt;
    l->si = si;
    l->pass = pool->wake_gen; /* a wake run under way serves the places it found */
    l->next = NULL;
    l->prev = pool->qtail;
    if (pool->qtail)
        pool->qtail->next = l;
    else
        pool->qhead = l;
    pool->qtail = l;
    pool->nlinks++;
    if (pool->qhead == l)
        qtimer_arm(pool);
    if (pool_has_room(pool))
        event_active(pool->wake_ev, 0, 0); /* room while the queue was being served: it is this one's turn soon */
}

int
gw_upstream_wait(gw_worker_t *w, const gw_backend_t *b, uint32_t servers, unsigned prefer, uint64_t expires_ms,
                 gw_upstream_wait_t *wt, gw_upstream_wait_cb cb, void *arg)
{
    unsigned n = 0;
    gw_pool_t *charged = NULL;
    gw_upstream_wait_cancel(wt); /* its places are about to be reused */
    if (b->nservers < 32)
        servers &= (1u << b->nservers) - 1;
    if (prefer < b->nservers && (servers & (1u << prefer)) && gw_upstream_pool(w, b, prefer)->nqueued < b->max_pending)
        charged = gw_upstream_pool(w, b, prefer);
    for (unsigned si = 0; si < b->nservers; si++) {
        if (!(servers & (1u << si)))
            continue;
        n++;
        gw_pool_t *pool = gw_upstream_pool(w, b, si);
        if (charged == NULL && pool->nqueued < b->max_pending)
            charged = pool;
    }
    if (charged == NULL) {
        if (b->max_pending > 0 && n > 0)
            gw_m_add(&gw_upstream_pool(w, b, prefer < b->nservers ? prefer : 0)->m->queue_rejected, 1);
        return GW_AGAIN;
    }
    if (n - 1 > wt->nmore) {
        wt->more = gw_realloc(wt->more, (size_t)(n - 1) * sizeof(*wt->more));
        wt->nmore = n - 1;
    }
    wt->b = b;
    wt->cb = cb;
    wt->arg = arg;
    wt->expires_ms = expires_ms;
    wt->charged = charged;
    charged->nqueued++;
    gw_m_gauge(&charged->m->queued, 1);
    wt->nlinks = 0;
    for (unsigned si = 0; si < b->nservers; si++) {
        if (servers & (1u << si))
            queue_link(gw_upstream_pool(w, b, si), wt, wait_link(wt, wt->nlinks++), si);
    }
    return GW_OK;
}

void
gw_upstream_wait_cancel(gw_upstream_wait_t *wt)
{
    gw_pool_t *charged = wt->charged;
    if (charged == NULL)
        return;
    for (unsigned k = 0; k < wt->nlinks; k++)
        queue_unlink(wait_link(wt, k));
    wt->nlinks = 0;
    wt->charged = NULL;
    charged->nqueued--;
    gw_m_gauge(&charged->m->queued, -1);
}

void
gw_upstream_wait_free(gw_upstream_wait_t *wt)
{
    gw_upstream_wait_cancel(wt);
    free(wt->more);
    wt->more = NULL;
    wt->nmore = 0;
}

static void
pool_set_backend(gw_pool_t *pool, const gw_backend_t *b, unsigned si, gw_config_t *cfg)
{
    gw_worker_t *w = pool->w;
    pool->srv = &b->servers[si];
    pool->si = si;
    struct timeval tv = { b->timeout_ms / 1000, (b->timeout_ms % 1000) * 1000 };
    pool->backend = b;
    pool->call_tv = tv;
    pool->call_timeout = event_base_init_common_timeout(w->base, &tv);
    if (pool->call_timeout == NULL) /* libevent allows 256 per base */
        pool->call_timeout = &pool->call_tv;
    struct timeval itv = { b->idle_timeout_ms / 1000, (b->idle_timeout_ms % 1000) * 1000 };
    pool->idle_tv = itv;
    pool->idle_timeout = event_base_init_common_timeout(w->base, &itv);
    if (pool->idle_timeout == NULL)
        pool->idle_timeout = &pool->idle_tv;
    if (pool->name)
        pool->name->host = pool->srv->host_name; /* the same name: the URLs are equal */
    gw_config_ref(cfg);
    gw_config_unref(pool->cfg);
    pool->cfg = cfg;
}

static gw_pool_t *
pool_new(gw_worker_t *w, const gw_backend_t *b, unsigned si, gw_config_t *cfg)
{
    const gw_peer_t *srv = &b->servers[si];
    gw_pool_t *pool = gw_calloc(1, sizeof(gw_pool_t));
    pool->w = w;
    pool->m = &w->m->backends[b->mid];
    pool->ms = &w->m->servers[srv->mid];
    pool->refs = 1;
    pool->wake_ev = event_new(w->base, -1, 0, wake_cb, pool);
    pool->qtimer = evtimer_new(w->base, qtimer_cb, pool);
    if (srv->host_name != NULL) {
        pool->name = gw_calloc(1, sizeof(gw_dns_name_t));
        gw_dns_name_init(pool->name, w->dns, srv->host_name, srv->port, pool_resolved, pool);
        pool->fail_ev = event_new(w->base, -1, 0, fail_ev_cb, pool);
    }
    pool_set_backend(pool, b, si, cfg);
    return pool;
}

static void
pool_free(gw_pool_t *pool)
{
    if (pool->session)
        SSL_SESSION_free(pool->session);
    if (pool->name) {
        /* No waiters: they count in nopen. */
        gw_dns_name_free(pool->name); /* cancels a query in flight */
        free(pool->name);
        event_free(pool->fail_ev);
        free(pool->aidle);
    }
    /* No waiters either: they belong to requests of configurations that use it. */
    event_free(pool->wake_ev);
    event_free(pool->qtimer);
    gw_config_unref(pool->cfg);
    free(pool);
}

/* Frees a pool that no configuration uses once its last connection is gone. */
static void
pool_check_unused(gw_pool_t *pool)
{
    if (pool->refs == 0 && pool->nopen == 0 && pool->holds == 0)
        pool_free(pool);
}

gw_pool_t *
gw_upstream_pool(gw_worker_t *w, const gw_backend_t *b, unsigned si)
{
    return b->pools[(size_t)w->id * b->nservers + si];
}

/* The pool of worker w for the server of old (the configuration w used so
 * far) that b's server s is the same connection as: same backend name, same
 * conn_key (URL, connect timeout, TLS settings); NULL when none. */
static gw_pool_t *
pool_of_old(gw_worker_t *w, gw_config_t *old, const gw_backend_t *b, const gw_peer_t *s)
{
    for (size_t k = 0; old && k < old->nbackends; k++) {
        const gw_backend_t *o = old->backends[k];
        if (strcmp(o->name, b->name) != 0)
            continue;
        for (size_t j = 0; j < o->nservers; j++) {
            gw_pool_t *pool = o->pools[(size_t)w->id * o->nservers + j];
            if (pool && o->servers[j].conn_key && s->conn_key && strcmp(o->servers[j].conn_key, s->conn_key) == 0)
                return pool;
        }
        return NULL;
    }
    return NULL;
}

void
gw_upstream_pools_attach(gw_worker_t *w, gw_config_t *cfg, gw_config_t *old)
{
    for (size_t i = 0; i < cfg->nbackends; i++) {
        const gw_backend_t *b = cfg->backends[i];
        for (unsigned si = 0; si < b->nservers; si++) {
            gw_pool_t *pool = pool_of_old(w, old, b, &b->servers[si]);
            if (pool == NULL) {
                pool = pool_new(w, b, si, cfg);
            } else {
                pool->refs++;
                pool_set_backend(pool, b, si, cfg);
                /* A session of the old TLS context is not offered to the new one. */
                if (pool->session) {
                    SSL_SESSION_free(pool->session);
                    pool->session = NULL;
                }
            }
            b->pools[(size_t)w->id * b->nservers + si] = pool;
        }
    }
}

void
gw_upstream_pools_detach(gw_worker_t *w, gw_config_t *cfg)
{
    for (size_t i = 0; i < cfg->nbackends; i++) {
        const gw_backend_t *b = cfg->backends[i];
        for (size_t si = 0; si < b->nservers; si++) {
            gw_pool_t **slot = &b->pools[(size_t)w->id * b->nservers + si];
            gw_pool_t *pool = *slot;
            if (pool == NULL)
                continue;
            *slot = NULL;
            if (--pool->refs > 0)
                continue;
            pool->holds++; /* not freed by the close of its last idle connection while the list empties */
            while (pool->idle) {
                gw_upstream_t *u = pool->idle;
                idle_unlink(u);
                upstream_close(u);
            }
            pool->holds--;
            pool_check_unused(pool);
        }
    }
}

/*
 * The idle connection a request takes, or NULL for a new one. Without a
 * host name: the most recently released. With one, the request's address
 * has its turn (has_addr: idx): the most recently released connection to
 * it; when there is none and the pool is at max_connections, the most
 * recently released to any address rather than none (a full pool neither
 * closes a warm connection to open another nor makes the call wait while
 * one is idle).
 */
static gw_upstream_t *
idle_take(gw_pool_t *pool, const gw_backend_t *b, bool has_addr, size_t idx)
{
    if (pool->name == NULL)
        return pool->idle;
    if (has_addr && pool->aidle[idx] != NULL)
        return pool->aidle[idx];
    return pool->nopen >= b->max_connections ? pool->idle : NULL;
}

int
gw_upstream_get(gw_worker_t *w, const gw_backend_t *b, unsigned si, bool fresh, gw_upstream_t **out)
{
    gw_pool_t *pool = gw_upstream_pool(w, b, si);
    if (pool->name)
        gw_dns_name_refresh(pool->name); /* an expired answer is refreshed even while pooled connections serve */
    if (!fresh && pool->qhead && !pool->serving)
        return GW_AGAIN; /* calls are waiting: a newcomer queues behind them */
    /* A host name: every request (not every new connection) takes the next
     * address in turn, so requests spread evenly over the addresses even
     * while one warm connection could serve them all. The turn is given
     * back when the pool cannot serve the request (GW_AGAIN). */
    const gw_dns_addr_t *a = NULL;
    size_t idx = 0, turn = 0;
    int rc = GW_OK;
    if (pool->name) {
        turn = pool->name->next;
        rc = gw_dns_name_pick(pool->name, &a, &idx);
        idle_sync(pool); /* after the pick, which may have read the hosts file */
    }
    gw_upstream_t *u = fresh ? NULL : idle_take(pool, b, rc == GW_OK, idx);
    if (u != NULL) {
        idle_unlink(u);
        evtimer_del(u->timer);
        u->reused = true;
        *out = u;
        return GW_OK;
    }
    if (pool->nopen >= b->max_connections) {
        if (pool->idle == NULL) {
            if (pool->name)
                pool->name->next = turn;
            return GW_AGAIN;
        }
        /* fresh was asked for and the pool is full: make room (the coldest goes) */
        gw_upstream_t *old = pool->idle_tail;
        idle_unlink(old);
        upstream_close(old);
    }
    u = gw_calloc(1, sizeof(gw_upstream_t));
    u->pool = pool;
    u->fd = -1;
    u->timer = evtimer_new(w->base, timer_cb, u);
    pool->nopen++;
    count_open(pool, 1);
    if (b->tls) {
        if (tls_new(u, w, pool, b) != GW_OK) {
            upstream_close(u);
            errno = ENOMEM;
            return GW_ERR;
        }
    } else {
        u->in = evbuffer_new();
        u->out = evbuffer_new();
        if (u->in == NULL || u->out == NULL) {
            gw_log_rl(GW_LOG_ERR, "backend %s: out of memory while connecting", b->name);
            abort(); /* our allocation policy: out of memory is fatal */
        }
    }
    const struct sockaddr *sa = (const struct sockaddr *)&pool->srv->addr;
    socklen_t salen = pool->srv->addrlen;
    if (pool->name && rc == GW_OK) {
        u->addr_gen = pool->name->gen;
        u->addr_idx = idx;
        sa = (const struct sockaddr *)&a->sa;
        salen = a->len;
    }
    if (rc == GW_OK) {
        if (start_connect(u, sa, salen) != GW_OK) {
            int err = errno;
            upstream_close(u);
            errno = err;
            return GW_ERR;
        }
    } else {
        /* No address yet: wait for the answer (GW_AGAIN), or fail from the
         * loop when the name is known to fail (GW_ERR): the caller's
         * callbacks are not installed yet. */
        waiter_add(u);
        if (rc == GW_ERR) {
            u->resolve_failed = true;
            event_active(pool->fail_ev, 0, 0);
        }
    }
    *out = u;
    return GW_OK;
}

void
gw_upstream_setcb(gw_upstream_t *u, gw_upstream_cb read, gw_upstream_cb drained, gw_upstream_event_cb event,
                  void *arg, size_t low_water)
{
    u->read_cb = read;
    u->drained_cb = drained;
    u->event_cb = event;
    u->arg = arg;
    u->low_water = low_water;
    u->err = 0;
    if (u->bev) {
        bufferevent_setwatermark(u->bev, EV_WRITE, low_water, 0);
        bufferevent_enable(u->bev, EV_READ | EV_WRITE);
    } else {
        plain_read_enable(u, true);
    }
}

struct evbuffer *
gw_upstream_input(gw_upstream_t *u)
{
    return u->in;
}

struct evbuffer *
gw_upstream_output(gw_upstream_t *u)
{
    return u->out;
}

void
gw_upstream_send(gw_upstream_t *u)
{
    if (u->bev || !u->connected || u->err)
        return; /* the bufferevent writes by itself; a connect flushes when done */
    if (plain_flush(u) == GW_ERR) {
        /* reported from the loop, not from inside the caller */
        event_active(u->wev, EV_WRITE, 1);
    }
}

void
gw_upstream_read(gw_upstream_t *u, bool on)
{
    if (u->bev) {
        if (on)
            bufferevent_enable(u->bev, EV_READ);
        else
            bufferevent_disable(u->bev, EV_READ);
    } else {
        plain_read_enable(u, on);
    }
}

void
gw_upstream_release(gw_upstream_t *u, bool reusable)
{
    gw_pool_t *pool = u->pool;
    const gw_backend_t *b = pool->backend;
    if (u->waiting)
        waiter_unlink(u); /* released before its address arrived (client gone, deadline) */
    if (!reusable || !u->connected || pool->nidle >= b->max_idle || evbuffer_get_length(u->in) > 0 ||
        evbuffer_get_length(u->out) > 0 || u->err || pool->w->stopping || pool->refs == 0) {
        upstream_close(u);
        return;
    }
    if (pool->name && !addr_current(u)) {
        upstream_close(u); /* a new answer dropped its address while it was in use */
        return;
    }
    u->requests++;
    u->idle = true;
    u->read_cb = NULL;
    u->drained_cb = NULL;
    u->event_cb = NULL;
    u->arg = NULL;
    gw_upstream_read(u, true); /* anything from the backend now means it is gone */
    /* every idle timer of the pool has the same length: a common timeout
     * keeps them in a queue (O(1) add and delete per call, not a heap) */
    evtimer_add(u->timer, pool->idle_timeout);
    idle_push(u);
    queue_notify(pool);
}
