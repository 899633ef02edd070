/*
 * gw_upstream.h - connections to backends and the per-worker pools that
 * keep them alive between requests.
 *
 * A worker has one pool per backend. gw_upstream_get() hands out an idle
 * connection (most recently used first, so the warmest socket is reused) or
 * starts a new one; the caller owns it until gw_upstream_release(), which
 * returns it to the pool when it is reusable (a whole response was read and
 * both sides allow keep-alive) or closes it. A connection is never pooled
 * half-read: a caller that gives up (deadline, client gone) releases it as
 * not reusable.
 *
 * While idle, the pool watches the socket: any byte or EOF from the backend
 * means the connection is unusable and it is closed at once; after the
 * backend's idle_timeout_ms it is closed too.
 */
#ifndef GW_UPSTREAM_H
#define GW_UPSTREAM_H

#include "gw_core.h"

#include <event2/bufferevent.h>
#include <openssl/ssl.h>

struct gw_pool_s {
    const gw_backend_t *backend;
    SSL_SESSION *session;   /* the latest TLS session, for resumption */
    gw_upstream_t *idle;    /* LIFO list of idle connections */
    unsigned nidle;
    unsigned nopen;         /* idle + in use + connecting */
};

struct gw_upstream_s {
    gw_pool_t *pool;
    gw_worker_t *w;
    struct bufferevent *bev;
    struct event *idle_timer;
    gw_upstream_t *next;    /* in the idle list */
    bool reused;            /* it served an earlier request */
    bool connected;
    bool broken;            /* failed mid-use: its TLS session must not be resumed */
    unsigned requests;
};

/* Sets up the pools of worker w for every backend of its configuration. */
void gw_upstream_pools_init(gw_worker_t *w);
/* Closes every idle connection and frees the pools (worker stop). */
void gw_upstream_pools_free(gw_worker_t *w);

/*
 * A connection to backend b: idle from the pool unless fresh is true, else
 * a new one (connect started; the caller sees BEV_EVENT_CONNECTED or an
 * error on its bufferevent). GW_AGAIN when max_connections is reached,
 * GW_ERR when a socket cannot be made (errno set). The caller installs its
 * own bufferevent callbacks.
 */
int gw_upstream_get(gw_worker_t *w, const gw_backend_t *b, bool fresh, gw_upstream_t **out);

/* Gives u back: pooled when reusable (and the pool has room), else closed. */
void gw_upstream_release(gw_upstream_t *u, bool reusable);

/* OpenSSL's new-session callback, installed on every backend SSL_CTX: keeps
 * the session in the pool of the connection that received it. */
int gw_upstream_tls_new_session(SSL *ssl, SSL_SESSION *sess);

/* Describes why the TLS connection of u failed, into buf. */
const char *gw_upstream_tls_error(gw_upstream_t *u, char *buf, size_t len);

#endif
