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
 *
 * A backend named by host name connects to the addresses of the pool's
 * gw_dns_name_t in turn. Before the first answer, a new connection waits:
 * gw_upstream_get() still returns it, with a bufferevent that has no socket
 * yet, and connects it when the answer arrives; when the name cannot be
 * resolved its event callback gets BEV_EVENT_ERROR with u->resolve_failed
 * set. So callers see one contract either way: BEV_EVENT_CONNECTED or an
 * error. Waiters count towards max_connections, which bounds them. When a
 * new answer drops an address, idle connections to it are closed.
 */
#ifndef GW_UPSTREAM_H
#define GW_UPSTREAM_H

#include "gw_core.h"

#include <event2/bufferevent.h>
#include <sys/socket.h>
#include <openssl/ssl.h>

struct gw_pool_s {
    const gw_backend_t *backend;
    SSL_SESSION *session;   /* the latest TLS session, for resumption */
    gw_upstream_t *idle;    /* LIFO list of idle connections */
    unsigned nidle;
    unsigned nopen;         /* idle + in use + connecting + waiting */
    gw_dns_name_t *name;    /* the backend's host name and addresses; NULL for an IP address */
    gw_upstream_t *waiters; /* doubly linked: connections waiting for the name's addresses */
    unsigned nwaiting;
    struct event *fail_ev;  /* reports resolution failures from the loop, not from gw_upstream_get() */
};

struct gw_upstream_s {
    gw_pool_t *pool;
    gw_worker_t *w;
    struct bufferevent *bev;
    struct event *idle_timer;
    gw_upstream_t *next;    /* in the idle list, or the waiters */
    gw_upstream_t *prev;    /* in the waiters */
    bool reused;            /* it served an earlier request */
    bool connected;
    bool broken;            /* failed mid-use: its TLS session must not be resumed */
    bool waiting;           /* no address yet: in pool->waiters */
    bool connecting;        /* a connect was started (to addr_idx of addr_gen for a host name) */
    bool resolve_failed;    /* the host name could not be resolved (reported as BEV_EVENT_ERROR) */
    unsigned requests;
    unsigned addr_gen;
    size_t addr_idx;
    struct sockaddr_storage sa; /* the address connected to */
    socklen_t salen;
};

/* Sets up the pools of worker w for every backend of its configuration. */
void gw_upstream_pools_init(gw_worker_t *w);
/* Closes every idle connection and frees the pools (worker stop). */
void gw_upstream_pools_free(gw_worker_t *w);

/*
 * A connection to backend b: idle from the pool unless fresh is true, else
 * a new one (connect started, or waiting for the host name's addresses; the
 * caller sees BEV_EVENT_CONNECTED or an error on its bufferevent, never
 * before this returns). GW_AGAIN when max_connections is reached, GW_ERR
 * when a socket cannot be made (errno set). The caller installs its own
 * bufferevent callbacks and may enable events and queue output at once.
 */
int gw_upstream_get(gw_worker_t *w, const gw_backend_t *b, bool fresh, gw_upstream_t **out);

/* Gives u back: pooled when reusable (and the pool has room), else closed. */
void gw_upstream_release(gw_upstream_t *u, bool reusable);

/* OpenSSL's new-session callback, installed on every backend SSL_CTX: keeps
 * the session in the pool of the connection that received it. */
int gw_upstream_tls_new_session(SSL *ssl, SSL_SESSION *sess);

/* Why the host name of u's backend could not be resolved ("name does not
 * exist (NXDOMAIN)"); borrowed, valid until the next callback. */
const char *gw_upstream_resolve_error(const gw_upstream_t *u);

/* Describes why the TLS connection of u failed, into buf. */
const char *gw_upstream_tls_error(gw_upstream_t *u, char *buf, size_t len);

#endif
