/*
 * gw_upstream.c - backend connections and per-worker keep-alive pools (see
 * gw_upstream.h). Upstream connections use bufferevents: they bring the
 * asynchronous connect and bufferevent_openssl for TLS. A bufferevent made
 * with no socket can be handed out, configured and written to before it
 * connects; that is how a connection waits for a host name's addresses.
 */
#include "gw_upstream.h"
#include "gw_config.h"
#include "gw_dns.h"
#include "gw_log.h"
#include "gw_server.h"

#include <errno.h>
#include <event2/buffer.h>
#include <event2/bufferevent_ssl.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>
#include <pthread.h>
#include <stdio.h>
#include <event2/event.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdlib.h>
#include <string.h>

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

/* Closes u and frees it. A connect that failed (the caller marked u broken
 * before it was connected) makes the pool avoid that address for a while. */
static void
upstream_close(gw_upstream_t *u)
{
    if (u->waiting)
        waiter_unlink(u);
    if (u->pool->name && u->connecting && !u->connected && u->broken)
        gw_dns_name_mark_down(u->pool->name, u->addr_gen, u->addr_idx);
    u->pool->nopen--;
    SSL *ssl = u->pool->backend->tls ? bufferevent_openssl_get_ssl(u->bev) : NULL;
    if (ssl && u->connected && !u->broken) {
        /* A connection that ended cleanly: without this, SSL_free() would
         * mark its session not resumable (no close_notify was exchanged). */
        SSL_set_shutdown(ssl, SSL_SENT_SHUTDOWN | SSL_RECEIVED_SHUTDOWN);
    }
    if (u->idle_timer)
        event_free(u->idle_timer);
    bufferevent_free(u->bev); /* closes the socket */
    free(u);
}

static void
idle_unlink(gw_upstream_t *u)
{
    gw_pool_t *pool = u->pool;
    for (gw_upstream_t **pp = &pool->idle; *pp; pp = &(*pp)->next)
        if (*pp == u) {
            *pp = u->next;
            pool->nidle--;
            break;
        }
    u->next = NULL;
}

/* Anything from an idle connection (data, EOF, error) makes it unusable. */
static void
idle_read_cb(struct bufferevent *bev, void *arg)
{
    gw_upstream_t *u = arg;
    GW_UNUSED(bev);
    gw_log_debug("backend %s: unexpected data on an idle connection; closing it", u->pool->backend->name);
    idle_unlink(u);
    upstream_close(u);
}

static void
idle_event_cb(struct bufferevent *bev, short what, void *arg)
{
    gw_upstream_t *u = arg;
    GW_UNUSED(bev);
    GW_UNUSED(what);
    idle_unlink(u);
    upstream_close(u);
}

static void
idle_timeout_cb(evutil_socket_t fd, short what, void *arg)
{
    gw_upstream_t *u = arg;
    GW_UNUSED(fd);
    GW_UNUSED(what);
    idle_unlink(u);
    upstream_close(u);
}

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

/* A TLS bufferevent for backend b: SNI and the certificate name check come
 * from tls.server_name (an IP address is checked against IP SANs). */
static struct bufferevent *
tls_bufferevent(gw_worker_t *w, gw_pool_t *pool, const gw_backend_t *b)
{
    pthread_once(&pool_ex_once, pool_ex_init);
    SSL *ssl = SSL_new(b->ssl_ctx);
    if (ssl == NULL)
        return NULL;
    SSL_set_ex_data(ssl, pool_ex_index, pool);
    if (b->tls_name_is_ip) {
        if (b->tls_verify)
            X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(ssl), b->tls_server_name);
    } else {
        SSL_set_tlsext_host_name(ssl, b->tls_server_name);
        if (b->tls_verify)
            SSL_set1_host(ssl, b->tls_server_name);
    }
    if (pool->session)
        SSL_set_session(ssl, pool->session);
    struct bufferevent *bev =
        bufferevent_openssl_socket_new(w->base, -1, ssl, BUFFEREVENT_SSL_CONNECTING, BEV_OPT_CLOSE_ON_FREE);
    if (bev == NULL) {
        SSL_free(ssl);
        return NULL;
    }
    /* Many servers close without close_notify; a cut body is still caught
     * by the HTTP framing (Content-Length, chunked). */
    bufferevent_openssl_set_allow_dirty_shutdown(bev, 1);
    return bev;
}

/*
 * Starts connecting u to sa. The caller's callbacks are set aside during
 * the call, so a connect that fails at once never calls back into code
 * that is still setting u up; the events the caller enabled stay enabled.
 * GW_ERR with errno set when no socket could be made.
 */
static int
start_connect(gw_upstream_t *u, const struct sockaddr *sa, socklen_t salen)
{
    const gw_backend_t *b = u->pool->backend;
    bufferevent_data_cb rcb, wcb;
    bufferevent_event_cb ecb;
    void *arg;
    bufferevent_getcb(u->bev, &rcb, &wcb, &ecb, &arg);
    short enabled = bufferevent_get_enabled(u->bev);
    bufferevent_setcb(u->bev, NULL, NULL, NULL, NULL);
    struct timeval tv = { b->connect_timeout_ms / 1000, (b->connect_timeout_ms % 1000) * 1000 };
    bufferevent_set_timeouts(u->bev, NULL, &tv); /* a connect completes as a write */
    memcpy(&u->sa, sa, salen);
    u->salen = salen;
    int rc = bufferevent_socket_connect(u->bev, sa, (int)salen);
    int err = errno;
    bufferevent_setcb(u->bev, rcb, wcb, ecb, arg);
    if (rc != 0) {
        errno = err; /* no socket (EMFILE, ...): not the address's fault */
        return GW_ERR;
    }
    u->connecting = true;
    if (enabled)
        bufferevent_enable(u->bev, enabled);
    evutil_socket_t fd = bufferevent_getfd(u->bev);
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    return GW_OK;
}

/* Reports an error to the caller of waiting connection u, through its
 * event callback. Only from a loop callback of our own (the caller's
 * callback may free u and its client connection). */
static void
report_error(gw_upstream_t *u, int err)
{
    EVUTIL_SET_SOCKET_ERROR(err);
    bufferevent_trigger_event(u->bev, BEV_EVENT_ERROR, 0);
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
        gw_log(GW_LOG_WARN, "backend %s: cannot resolve %s: %s; %s%s, retrying in %d ms at the earliest", b->name,
               n->host, n->errtext, n->naddrs ? "keeping the last addresses: " : "no addresses",
               n->naddrs ? gw_dns_name_list(n, list, sizeof(list)) : "", n->ttl_ms);
    } else {
        gw_log(GW_LOG_INFO, "backend %s: %s is %s (for %d ms)", b->name, n->host, gw_dns_name_list(n, list, sizeof(list)),
               n->ttl_ms);
    }
    for (gw_upstream_t **pp = &pool->idle; *pp;) {
        gw_upstream_t *u = *pp;
        if (gw_dns_name_has(n, (struct sockaddr *)&u->sa, u->salen)) {
            pp = &u->next;
            continue;
        }
        *pp = u->next;
        pool->nidle--;
        u->next = NULL;
        upstream_close(u);
    }
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

void
gw_upstream_pools_init(gw_worker_t *w)
{
    w->pools = gw_calloc(w->cfg->nbackends, sizeof(gw_pool_t));
    for (size_t i = 0; i < w->cfg->nbackends; i++) {
        gw_pool_t *pool = &w->pools[i];
        pool->backend = w->cfg->backends[i];
        if (pool->backend->host_name != NULL) {
            pool->name = gw_calloc(1, sizeof(gw_dns_name_t));
            gw_dns_name_init(pool->name, w->dns, pool->backend->host_name, pool->backend->port, pool_resolved, pool);
            pool->fail_ev = event_new(w->base, -1, 0, fail_ev_cb, pool);
        }
    }
}

const char *
gw_upstream_resolve_error(const gw_upstream_t *u)
{
    const gw_dns_name_t *n = u->pool->name;
    return n && n->errtext[0] ? n->errtext : "unknown error";
}

void
gw_upstream_pools_free(gw_worker_t *w)
{
    if (w->pools == NULL)
        return;
    for (size_t i = 0; i < w->cfg->nbackends; i++)
        while (w->pools[i].idle) {
            gw_upstream_t *u = w->pools[i].idle;
            idle_unlink(u);
            upstream_close(u);
        }
    for (size_t i = 0; i < w->cfg->nbackends; i++) {
        gw_pool_t *pool = &w->pools[i];
        if (pool->session)
            SSL_SESSION_free(pool->session);
        if (pool->name) {
            /* Waiters belong to client connections, all closed by now. */
            gw_dns_name_free(pool->name); /* cancels a query in flight */
            free(pool->name);
            event_free(pool->fail_ev);
        }
    }
    free(w->pools);
    w->pools = NULL;
}

int
gw_upstream_get(gw_worker_t *w, const gw_backend_t *b, bool fresh, gw_upstream_t **out)
{
    gw_pool_t *pool = &w->pools[b->index];
    if (pool->name)
        gw_dns_name_refresh(pool->name); /* an expired answer is refreshed even while pooled connections serve */
    if (!fresh && pool->idle) {
        gw_upstream_t *u = pool->idle;
        idle_unlink(u);
        event_del(u->idle_timer);
        bufferevent_setcb(u->bev, NULL, NULL, NULL, NULL);
        u->reused = true;
        *out = u;
        return GW_OK;
    }
    if (pool->nopen >= b->max_connections) {
        if (pool->idle == NULL)
            return GW_AGAIN;
        /* fresh was asked for and the pool is full: make room */
        gw_upstream_t *old = pool->idle;
        idle_unlink(old);
        upstream_close(old);
    }
    struct bufferevent *bev =
        b->tls ? tls_bufferevent(w, pool, b) : bufferevent_socket_new(w->base, -1, BEV_OPT_CLOSE_ON_FREE);
    if (bev == NULL) {
        errno = ENOMEM;
        return GW_ERR;
    }
    gw_upstream_t *u = gw_calloc(1, sizeof(gw_upstream_t));
    u->pool = pool;
    u->w = w;
    u->bev = bev;
    u->idle_timer = evtimer_new(w->base, idle_timeout_cb, u);
    pool->nopen++;
    if (pool->name == NULL) {
        if (start_connect(u, (const struct sockaddr *)&b->addr, b->addrlen) != GW_OK) {
            int err = errno;
            upstream_close(u);
            errno = err;
            return GW_ERR;
        }
        *out = u;
        return GW_OK;
    }
    const gw_dns_addr_t *a;
    size_t idx;
    int rc = gw_dns_name_pick(pool->name, &a, &idx);
    if (rc == GW_OK) {
        u->addr_gen = pool->name->gen;
        u->addr_idx = idx;
        if (start_connect(u, (const struct sockaddr *)&a->sa, a->len) != GW_OK) {
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
gw_upstream_release(gw_upstream_t *u, bool reusable)
{
    gw_pool_t *pool = u->pool;
    const gw_backend_t *b = pool->backend;
    struct evbuffer *in = bufferevent_get_input(u->bev);
    if (u->waiting)
        waiter_unlink(u); /* released before its address arrived (client gone, deadline) */
    if (!reusable || !u->connected || pool->nidle >= b->max_idle || evbuffer_get_length(in) > 0 ||
        u->w->stopping) {
        upstream_close(u);
        return;
    }
    u->requests++;
    bufferevent_set_timeouts(u->bev, NULL, NULL);
    bufferevent_setcb(u->bev, idle_read_cb, NULL, idle_event_cb, u);
    bufferevent_enable(u->bev, EV_READ);
    struct timeval tv = { b->idle_timeout_ms / 1000, (b->idle_timeout_ms % 1000) * 1000 };
    event_add(u->idle_timer, &tv);
    u->next = pool->idle;
    pool->idle = u;
    pool->nidle++;
}
