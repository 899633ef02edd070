/*
 * gw_server.h - the process: listening sockets, worker threads, and the
 * graceful stop.
 *
 * Shared nothing: each worker thread owns one event_base, its own
 * SO_REUSEPORT listener on every "listen" address (the kernel spreads
 * connections across them), and the connections it accepted. The only state
 * shared between threads is the immutable configuration, the atomic
 * connection counter that enforces max_connections, the memory budgets
 * (gw_budget.h) and the thread pool's queue (gw_tpool.h), where workers
 * hand large answers to parse and get them back through their own port.
 *
 * Reload: the main thread loads and checks a new configuration, opens the
 * sockets of listen addresses it adds, reads the resolver's files when the
 * reload sets up the first resolvers, and then switches every worker or
 * none, in two phases through each worker's mailbox: PREPARE (each worker
 * makes ready, on its own loop, what can fail there: its resolver, the
 * listeners of added addresses; nothing is used yet) and, when every worker
 * said yes, COMMIT; else ABORT, and the reload fails with the reason. On
 * COMMIT each worker switches at once: new requests start on the new
 * configuration (a "generation", gw_gen_t), requests in flight finish on
 * the one they started with, and a generation is freed by its worker when
 * its last request is done. Pools of backends whose connection settings did
 * not change are shared by both generations.
 */
#ifndef GW_SERVER_H
#define GW_SERVER_H

#include "gw_config.h"
#include "gw_core.h"
#include "gw_metrics.h"
#include "gw_tpool.h"

#include <event2/event.h>
#include <event2/util.h>
#include <pthread.h>
#include <sys/socket.h>
#include <time.h>

struct evconnlistener;
struct gw_dns_sys_s;

/* What the main thread asks of a worker's mailbox (gw_server_reload). */
typedef enum { GW_MAIL_NONE, GW_MAIL_PREPARE, GW_MAIL_COMMIT, GW_MAIL_ABORT } gw_mail_op_t;

/* The per-connection timers; their durations are the worker's common
 * timeouts (libevent keeps equal durations in O(1) queues, not the heap). */
typedef enum { GW_T_NONE, GW_T_HEADER, GW_T_BODY, GW_T_KEEPALIVE, GW_T_LINGER, GW_T_SEND, GW_T_DRAIN, GW_T_GONE,
               GW_T_MAX } gw_timer_t;

/* The loop-stall probe's period: a timer that records how late it fires
 * (gw_metrics.h, loop_stall). */
#define GW_PROBE_MS 10

/* At a graceful stop, an idle keep-alive connection may send one more
 * request (answered with Connection: close) for this long, at most
 * shutdown_timeout_ms: closing it at once would race with a request already
 * on its way, which the client would see as a reset. */
#define GW_DRAIN_IDLE_MS 1000
/* After a graceful stop begins, how long listeners keep completing the
 * handshakes already in flight (new ones are dropped) before they close. */
#define GW_STOP_LISTEN_GRACE_MS 50

/* A client that half-closed while its request is in flight: how often
 * gatherd looks whether the socket was reset (the client is gone, not
 * just done sending; see gw_conn.c). */
#define GW_GONE_POLL_MS 100

/* Connections accepted past max_connections by a worker without idle ones,
 * waiting for a worker that has some (gw_server.c). */
#define GW_HANDOFF_MAX 64

typedef struct {
    evutil_socket_t fd;
    struct sockaddr_storage addr;
    int addrlen;
} gw_handoff_t;

/* A configuration as one worker uses it. Worker thread only. */
struct gw_gen_s {
    gw_config_t *cfg;               /* one reference */
    unsigned refs;                  /* the worker while it is current, and each connection on it */
};

typedef struct {
    struct evconnlistener *lev;
    struct sockaddr_storage addr;
    socklen_t addrlen;
} gw_listener_t;

struct gw_worker_s {
    gw_server_t *srv;
    int id;
    pthread_t thread;
    struct event_base *base;
    gw_gen_t *gen;                  /* the configuration new requests start on */
    gw_config_t *cfg;               /* gen->cfg */
    gw_listener_t *listeners;
    size_t nlisteners;
    int wake_fd;                    /* eventfd the main thread writes to: stop, or look at the mailbox */
    struct event *wake_ev;
    pthread_mutex_t mail_mtx;       /* guards the mail_ fields */
    gw_mail_op_t mail_op;           /* back to NONE once the worker did COMMIT or ABORT */
    gw_config_t *mail_cfg;          /* PREPARE: the reloaded configuration (a reference), until the worker takes it */
    evutil_socket_t *mail_fds;      /* [mail_cfg->nlisten]: sockets of added addresses, else -1 */
    struct gw_dns_sys_s *mail_sys;  /* a reference: the resolver's files, when the reload sets up the resolvers */
    int mail_status;                /* PREPARE's answer: GW_AGAIN (none yet), GW_OK, GW_ERR (mail_err says why) */
    char mail_err[256];
    gw_config_t *prep_cfg;          /* made ready by PREPARE until COMMIT or ABORT (worker thread only) */
    gw_listener_t *prep_ls;         /* [prep_cfg->nlisten]: disabled listeners of added addresses, else lev NULL */
    gw_dns_t *prep_dns;             /* the resolver PREPARE set up; NULL: none needed */
    const struct timeval *timeouts[GW_T_MAX];
    struct timeval timeout_tv[GW_T_MAX]; /* when the base has no common timeout left */
    struct event *accept_timer;     /* re-enables accepting after EMFILE */
    struct event *force_timer;      /* shutdown_timeout_ms after the stop */
    struct event *listen_close_timer; /* GW_STOP_LISTEN_GRACE_MS after the stop: listeners close */
    bool stopping;
    unsigned refused;               /* connections refused since the last log line */
    time_t refused_logged_at;
    bool force;                     /* atomic: stop at once */
    bool stop;                      /* atomic: stop gracefully */
    gw_conn_t *conns;               /* doubly linked through gw_conn_t */
    gw_conn_t *idle_first, *idle_last; /* idle connections (no request begun, nothing to send), oldest
                                       first; closed first at max_connections (gw_conn.c) */
    uint64_t idle_oldest_us;        /* atomic (read by other workers): since when the oldest is idle; 0: none */
    gw_handoff_t handoff[GW_HANDOFF_MAX]; /* under mail_mtx: connections another worker accepted past
                                            max_connections for this one to take in place of an idle one */
    unsigned nhandoff;              /* under mail_mtx */
    unsigned drained;               /* idle connections closed for new ones since the last log line */
    time_t drained_logged_at;
    gw_pool_t *pools;               /* one per backend of cfg, see gw_upstream.h */
    gw_proxy_t *proxy_cache;        /* proxy contexts kept for reuse, see gw_proxy.c */
    unsigned nproxy_cache;
    void *agg_cache;                /* aggregate contexts kept for reuse, see gw_agg.c */
    void *cache_fetches;            /* the cache's upstream requests running on it, see gw_fetch.c */
    gw_dns_t *dns;                  /* resolver for backend host names; NULL when none has one */
    unsigned nconns;
    int exited;                     /* atomic: the thread has left its loop */
    gw_mworker_t *m;                /* its counters (gw_metrics.h): written by this thread only */
    gw_tport_t *tport;              /* where its thread pool jobs come back (gw_tpool.h) */
    struct event *probe_ev;         /* the loop-stall probe, every GW_PROBE_MS */
    uint64_t probe_due_us;          /* when it should fire next (gw_now_us) */
    uint64_t probe_run_us, probe_wait_us; /* the thread's time on a CPU and waiting for one, when armed */
    int probe_fd;                   /* /proc/thread-self/schedstat of the worker's thread, or -1 */
};

struct gw_server_s {
    gw_config_t *cfg;               /* the newest published configuration */
    gw_worker_t *workers;
    int nworkers;
    int started;                    /* threads running */
    unsigned conns;                 /* atomic: open client connections, all workers */
    gw_config_t *dns_cfg;           /* main thread: the configuration the workers' resolvers were set up
                                       with (a reference); NULL: no resolvers */
};

/*
 * Binds every listen address once per worker and prepares the workers'
 * loops; no worker runs yet (connections wait in the listen backlog), so
 * privileges can be dropped before the first request is read.
 * cfg: a reference is taken. GW_ERR with the reason in err.
 */
int gw_server_start(gw_server_t *s, gw_config_t *cfg, char *err, size_t errlen);

/* Starts the worker threads prepared by gw_server_start. GW_ERR with the
 * reason in err (those started run on; gw_server_stop stops them). */
int gw_server_run(gw_server_t *s, char *err, size_t errlen);

/*
 * Publishes cfg (main thread; a reference is taken): opens the sockets of
 * the listen addresses it adds, reads the resolver's files when cfg has
 * the first backend with a host name, then switches every worker to it
 * (each closes the listeners of addresses it removed), or none: GW_ERR with
 * the reason in err ("worker 1: resolver: cannot use nameserver ...") and
 * nothing changed. Blocks the main thread while the workers answer (each
 * phase at most 5 s).
 */
int gw_server_reload(gw_server_t *s, gw_config_t *cfg, char *err, size_t errlen);

/* Whether the running resolvers (if any) use "resolver" settings other
 * than cfg's: a reload does not change them. Main thread. */
bool gw_server_resolver_differs(const gw_server_t *s, const gw_config_t *cfg);

/* A socket bound to l (SO_REUSEADDR; SO_REUSEPORT when reuseport; listen()
 * when listening), non-blocking and close-on-exec; -1 with the reason in
 * err. */
evutil_socket_t gw_server_open_socket(const gw_listen_t *l, bool reuseport, bool listening, char *err, size_t errlen);

/* Takes a reference on w's current generation (a connection starting a request). */
gw_gen_t *gw_server_gen_ref(gw_worker_t *w);
/* Drops one; the last frees the generation and detaches its pools. */
void gw_server_gen_unref(gw_worker_t *w, gw_gen_t *g);

/* Asks every worker to stop: gracefully first, at once when force. Thread-safe. */
void gw_server_stop(gw_server_t *s, bool force);

/* True when every worker thread has left its loop. */
bool gw_server_done(gw_server_t *s);

/* Joins the threads and frees everything. */
void gw_server_free(gw_server_t *s);

/* Called by a connection as it is freed (worker thread). */
void gw_server_conn_closed(gw_worker_t *w);

#endif
