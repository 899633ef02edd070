/*
 * gw_server.h - the process: listening sockets, worker threads, and the
 * graceful stop.
 *
 * Shared nothing: each worker thread owns one event_base, its own
 * SO_REUSEPORT listener on every "listen" address (the kernel spreads
 * connections across them), and the connections it accepted. The only state
 * shared between threads is the immutable configuration and the atomic
 * connection counter that enforces max_connections.
 */
#ifndef GW_SERVER_H
#define GW_SERVER_H

#include "gw_core.h"

#include <event2/event.h>
#include <event2/util.h>
#include <pthread.h>
#include <time.h>

struct evconnlistener;

/* The per-connection timers; their durations are the worker's common
 * timeouts (libevent keeps equal durations in O(1) queues, not the heap). */
typedef enum { GW_T_NONE, GW_T_HEADER, GW_T_BODY, GW_T_KEEPALIVE, GW_T_LINGER, GW_T_SEND, GW_T_MAX } gw_timer_t;

struct gw_worker_s {
    gw_server_t *srv;
    int id;
    pthread_t thread;
    struct event_base *base;
    gw_config_t *cfg;               /* one reference */
    evutil_socket_t *fds;           /* listening sockets, until wrapped */
    struct evconnlistener **listeners;
    size_t nlisteners;
    int stop_fd;                    /* eventfd the main thread writes to stop us */
    struct event *stop_ev;
    const struct timeval *timeouts[GW_T_MAX];
    struct event *accept_timer;     /* re-enables accepting after EMFILE */
    struct event *force_timer;      /* shutdown_timeout_ms after the stop */
    bool stopping;
    unsigned refused;               /* connections refused since the last log line */
    time_t refused_logged_at;
    bool force;
    gw_conn_t *conns;               /* doubly linked through gw_conn_t */
    gw_pool_t *pools;               /* one per backend of cfg, see gw_upstream.h */
    gw_proxy_t *proxy_cache;        /* proxy contexts kept for reuse, see gw_proxy.c */
    unsigned nproxy_cache;
    void *agg_cache;                /* aggregate contexts kept for reuse, see gw_agg.c */
    gw_dns_t *dns;                  /* resolver for backend host names; NULL when none has one */
    unsigned nconns;
    int exited;                     /* atomic: the thread has left its loop */
};

struct gw_server_s {
    gw_config_t *cfg;
    gw_worker_t *workers;
    int nworkers;
    int started;                    /* threads running */
    unsigned conns;                 /* atomic: open client connections, all workers */
};

/*
 * Binds every listen address once per worker (failures are reported here,
 * before any thread runs) and starts the workers. cfg: a reference is taken.
 */
int gw_server_start(gw_server_t *s, gw_config_t *cfg, char *err, size_t errlen);

/* Asks every worker to stop: gracefully first, at once when force. Thread-safe. */
void gw_server_stop(gw_server_t *s, bool force);

/* True when every worker thread has left its loop. */
bool gw_server_done(gw_server_t *s);

/* Joins the threads and frees everything. */
void gw_server_free(gw_server_t *s);

/* Called by a connection as it is freed (worker thread). */
void gw_server_conn_closed(gw_worker_t *w);

#endif
