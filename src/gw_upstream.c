/*
 * gw_upstream.c - backend connections and per-worker keep-alive pools (see
 * gw_upstream.h). Upstream connections use bufferevents: they bring the
 * asynchronous connect and, later, bufferevent_openssl for TLS.
 */
#include "gw_upstream.h"
#include "gw_config.h"
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

static void
upstream_close(gw_upstream_t *u)
{
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

void
gw_upstream_pools_init(gw_worker_t *w)
{
    w->pools = gw_calloc(w->cfg->nbackends, sizeof(gw_pool_t));
    for (size_t i = 0; i < w->cfg->nbackends; i++)
        w->pools[i].backend = w->cfg->backends[i];
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
    for (size_t i = 0; i < w->cfg->nbackends; i++)
        if (w->pools[i].session)
            SSL_SESSION_free(w->pools[i].session);
    free(w->pools);
    w->pools = NULL;
}

int
gw_upstream_get(gw_worker_t *w, const gw_backend_t *b, bool fresh, gw_upstream_t **out)
{
    gw_pool_t *pool = &w->pools[b->index];
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
    struct timeval tv = { b->connect_timeout_ms / 1000, (b->connect_timeout_ms % 1000) * 1000 };
    bufferevent_set_timeouts(bev, NULL, &tv); /* a connect completes as a write */
    if (bufferevent_socket_connect(bev, (const struct sockaddr *)&b->addr, (int)b->addrlen) != 0) {
        int err = errno;
        upstream_close(u);
        errno = err;
        return GW_ERR;
    }
    evutil_socket_t fd = bufferevent_getfd(bev);
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    *out = u;
    return GW_OK;
}

void
gw_upstream_release(gw_upstream_t *u, bool reusable)
{
    gw_pool_t *pool = u->pool;
    const gw_backend_t *b = pool->backend;
    struct evbuffer *in = bufferevent_get_input(u->bev);
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
