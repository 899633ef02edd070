/*
 * gw_upstream.h - connections to backends and the per-worker pools that
 * keep them alive between requests.
 *
 * A worker has one pool per server of a backend ("servers", gw_config.h;
 * a backend with "url" has one): it connects to that server's address or
 * host name, sends its Host and its TLS name. Which server a try goes to
 * is gw_exchange's choice (gw_cluster_pick). gw_upstream_get() hands out an idle
 * connection (most recently used first, so the warmest socket is reused) or
 * starts a new one (for a host name: see below); the caller owns it until gw_upstream_release(), which
 * returns it to the pool when it is reusable (a whole response was read and
 * both sides allow keep-alive) or closes it. A connection is never pooled
 * half-read: a caller that gives up (deadline, client gone) releases it as
 * not reusable.
 *
 * I/O: the caller queues bytes in gw_upstream_output() and calls
 * gw_upstream_send(); what the backend sends arrives in gw_upstream_input()
 * and the read callback says so. Plain TCP connections do their own I/O the
 * way gw_conn does (a persistent read event, writes straight to the socket,
 * a write event only while the socket is full), so a request costs one
 * writev and one recv and no epoll_ctl. TLS connections run on
 * bufferevent_openssl behind the same calls.
 *
 * Callbacks: each event of the connection calls exactly one of the caller's
 * callbacks, as the last thing it does, so the callback may release the
 * connection (or free everything it owns).
 *
 * While idle, the pool watches the socket: any byte or EOF from the backend
 * means the connection is unusable and it is closed at once; after the
 * backend's idle_timeout_ms it is closed too.
 *
 * A server named by host name spreads its requests evenly over the
 * addresses of the pool's gw_dns_name_t: each gw_upstream_get() takes the
 * next address in turn (per worker, skipping addresses marked down after a
 * failed connect), then the most recent idle connection to that address or
 * a new one to it. So the server's weight in the balance is split equally
 * among its addresses, per request, not per connection (reusing the warmest
 * connection of the pool would send nearly every request to one address).
 * Idle connections are listed per address as well (pool->aidle). When the
 * pool is at max_connections and has none to the address whose turn it is,
 * the most recent idle connection to any address serves: a full pool
 * neither closes a warm connection to open another nor makes the call wait
 * while a connection is idle. max_connections and max_idle stay per server.
 * Health (checks, outlier ejection) is the server's, not each address's
 * (gw_cluster.h). Before the first answer, a new connection waits:
 * gw_upstream_get() still returns it (output can be queued, callbacks set)
 * and it connects when the answer arrives; when the name cannot be
 * resolved its event callback gets GW_UP_ERROR with u->resolve_failed set.
 * So callers see one contract either way: GW_UP_CONNECTED or an error.
 * Waiters count towards max_connections, which bounds them. When a new
 * answer drops an address, idle connections to it are closed, and one in
 * use is closed when released; an address it adds has its turn at once.
 *
 * max_connections, max_idle and max_pending are per pool, so per server:
 * a backend of three servers may open three times max_connections per
 * worker. The wait queue is per pool too, but a call that found every
 * usable server of its backend full waits in the queues of all of them at
 * once (gw_upstream_wait()) and takes the first that frees a connection.
 * A queue is never shared by the backend's servers: pools are kept per
 * server across reloads while a call belongs to one configuration, so a
 * call is only ever in the queues of its own configuration's servers.
 */
#ifndef GW_UPSTREAM_H
#define GW_UPSTREAM_H

#include "gw_core.h"
#include "gw_metrics.h"

#include <event2/util.h>
#include <openssl/ssl.h>
#include <sys/socket.h>
#include <sys/time.h>

struct evbuffer;
struct event;
struct bufferevent;

/* What the event callback reports. */
#define GW_UP_CONNECTED 0x01 /* connected (and, for TLS, handshaken) */
#define GW_UP_EOF 0x02       /* the backend closed its side */
#define GW_UP_ERROR 0x04     /* a socket or TLS error; gw_upstream_errno() says which */
#define GW_UP_TIMEOUT 0x08   /* connect_timeout_ms passed before GW_UP_CONNECTED */

typedef void (*gw_upstream_cb)(gw_upstream_t *u, void *arg);
typedef void (*gw_upstream_event_cb)(gw_upstream_t *u, int what, void *arg);

/*
 * A call waiting for a connection of full pools (gw_upstream_wait()): one
 * place (a gw_upstream_qlink_t) in the FIFO queue of each server's pool it
 * may take, all with the same expiry. The caller embeds the
 * gw_upstream_wait_t in its own context and owns it; the pools only link
 * its places. status GW_OK: a connection of server wt->si was released (or
 * closed, freeing a slot) and that server is usable (gw_cluster_usable)
 * now: call gw_upstream_get() for wt->si at once, which gives one unless
 * something else took it (then wait again). GW_AGAIN: queue_timeout_ms
 * passed. Either way the call is off every queue when cb runs, and cb
 * runs from a pool's own loop events, never inside another caller's
 * gw_upstream_release().
 */
typedef struct gw_upstream_wait_s gw_upstream_wait_t;
typedef struct gw_upstream_qlink_s gw_upstream_qlink_t;
typedef void (*gw_upstream_wait_cb)(gw_upstream_wait_t *wt, int status, void *arg);
struct gw_upstream_qlink_s {
    gw_pool_t *pool;                  /* set while queued */
    gw_upstream_qlink_t *next, *prev; /* in pool's queue */
    gw_upstream_wait_t *wt;           /* the call it is a place of */
    unsigned si;                      /* its server, in wt->b->servers */
    unsigned pass;                    /* == pool->wake_gen: passed over in this wake run (server not usable) */
};
struct gw_upstream_wait_s {
    const gw_backend_t *b;     /* the call's backend (of its configuration), set while queued */
    gw_pool_t *charged;        /* the pool whose max_pending counts the call; NULL: not queued */
    gw_upstream_qlink_t one;   /* the first place: a one-server backend allocates nothing */
    gw_upstream_qlink_t *more; /* the other places (nmore allocated on demand), freed by gw_upstream_wait_free() */
    unsigned nmore;
    unsigned nlinks;     /* places in queues: one, then more[0 .. nlinks - 2] */
    uint64_t expires_ms; /* monotonic ms: when queue_timeout_ms has passed */
    unsigned si;         /* with status GW_OK: the server whose pool has the free connection */
    gw_upstream_wait_cb cb;
    void *arg;
};

struct gw_pool_s {
    const gw_backend_t *backend; /* of the newest configuration that uses the pool */
    const gw_peer_t *srv;        /* its server in backend->servers */
    unsigned si;                 /* srv's index there */
    gw_config_t *cfg;            /* a reference: the configuration backend belongs to */
    gw_worker_t *w;
    unsigned refs;               /* configurations of the worker whose backend uses it */
    const struct timeval *call_timeout; /* the backend's timeout_ms: a common timeout of the worker's base */
    struct timeval call_tv;             /* ... or this when the base has no common timeout left */
    const struct timeval *idle_timeout; /* the backend's idle_timeout_ms, the same way */
    struct timeval idle_tv;
    SSL_SESSION *session;   /* the latest TLS session, for resumption */
    gw_upstream_t *idle;    /* doubly linked idle connections, most recently released first (LIFO) */
    gw_upstream_t *idle_tail; /* ... and the least recently released */
    unsigned nidle;
    /* A host name: the same idle connections again, one LIFO list per
     * address (through anext/aprev), indexed like the name's addresses of
     * generation aidle_gen (naidle entries); re-indexed when it changes. */
    gw_upstream_t **aidle;
    size_t naidle;
    unsigned aidle_gen;
    unsigned nopen;         /* idle + in use + connecting + waiting */
    gw_dns_name_t *name;    /* the server's host name and addresses; NULL for an IP address */
    gw_upstream_t *waiters; /* doubly linked: connections waiting for the name's addresses */
    unsigned nwaiting;
    struct event *fail_ev;  /* reports resolution failures from the loop, not from gw_upstream_get() */
    /* places of calls waiting for a connection (FIFO); a call may wait in
     * the queues of several servers of its backend at once, and counts
     * towards the max_pending of one of them (charged) */
    gw_upstream_qlink_t *qhead, *qtail;
    unsigned nlinks;        /* places in the queue */
    unsigned nqueued;       /* calls charged to this pool: at most the backend's max_pending */
    unsigned wake_gen;      /* wake_cb's runs, to mark the places it passed over */
    bool serving;           /* wake_cb is handing slots to waiters */
    unsigned holds;         /* code that may close its last connection is running (queue callbacks, detach): not freed meanwhile */
    struct event *wake_ev;  /* made active when a slot frees while calls wait */
    struct event *qtimer;   /* the head's queue_timeout_ms */
    gw_mbackend_t *m;       /* the worker's counters of the backend's name (gw_metrics.h) */
    gw_mserver_t *ms;       /* ... and of its server (backend name and server label) */
};

struct gw_upstream_s {
    gw_pool_t *pool;
    evutil_socket_t fd;
    struct bufferevent *bev; /* TLS only */
    struct event *rev;       /* plain: EV_READ | EV_PERSIST */
    struct event *wev;       /* plain: EV_WRITE | EV_PERSIST, armed while connecting or blocked */
    struct event *timer;     /* connect timeout, then idle timeout */
    struct evbuffer *in, *out; /* plain: ours; TLS: the bufferevent's */
    gw_upstream_cb read_cb;
    gw_upstream_cb drained_cb;
    gw_upstream_event_cb event_cb;
    void *arg;
    size_t low_water;        /* drained_cb when the output falls to this */
    gw_upstream_t *next;     /* in the idle list, or the waiters */
    gw_upstream_t *prev;     /* in the idle list, or the waiters */
    gw_upstream_t *anext;    /* idle, host name: in the list of its address (pool->aidle[addr_idx]) */
    gw_upstream_t *aprev;
    int err;                 /* errno of the last GW_UP_ERROR */
    int connect_err;         /* plain: the connect failed at once with this; reported from the loop */
    bool reused;             /* it served an earlier request */
    bool connected;
    bool reading;            /* plain: rev is registered */
    bool writing;            /* plain: wev is registered */
    bool idle;
    bool broken;             /* failed mid-use: its TLS session must not be resumed */
    bool waiting;            /* no address yet: in pool->waiters */
    bool connecting;         /* a connect was started (to addr_idx of addr_gen for a host name) */
    bool resolve_failed;     /* the host name could not be resolved (reported as GW_UP_ERROR) */
    unsigned requests;
    unsigned addr_gen;       /* host name: the generation of the name's addresses ... */
    size_t addr_idx;         /* ... and sa's index among them (kept current while idle) */
    struct sockaddr_storage sa; /* the address connected to */
    socklen_t salen;
};

/*
 * Pools and reloads. Worker w's pool for server si of backend b is
 * b->pools[w->id * b->nservers + si]. A worker attaches pools to each
 * configuration it starts using, server by server: a server whose
 * connection settings (its conn_key: URL, connect timeout, TLS) equal those
 * of a server of the same-named backend of old, the configuration it used
 * so far (NULL at start), shares that server's pool, idle connections
 * included; any other server gets a new pool. So a reload that adds or
 * removes one server of a backend keeps the pools of the others. Detaching (when no request of the worker uses cfg any
 * more) drops cfg's share; a pool no configuration uses closes its idle
 * connections at once and is freed with its last connection (requests still
 * running on it release theirs as not reusable).
 */
void gw_upstream_pools_attach(gw_worker_t *w, gw_config_t *cfg, gw_config_t *old);
void gw_upstream_pools_detach(gw_worker_t *w, gw_config_t *cfg);
/* Worker w's pool for server si of backend b (of a configuration w uses). */
gw_pool_t *gw_upstream_pool(gw_worker_t *w, const gw_backend_t *b, unsigned si);

/*
 * A connection to server si of backend b: idle from the pool unless fresh is true, else
 * a new one whose connect has started (GW_UP_CONNECTED or an error follows;
 * bytes queued before that are sent once connected). GW_AGAIN when
 * max_connections is reached, GW_ERR when a socket cannot be made (errno
 * set). The caller sets its callbacks with gw_upstream_setcb() before
 * returning to the event loop.
 */
int gw_upstream_get(gw_worker_t *w, const gw_backend_t *b, unsigned si, bool fresh, gw_upstream_t **out);

/*
 * Queues wt (owned by the caller, not queued) for a connection of the pool
 * of any server of b in servers (bit si set: server si; at most 32 servers)
 * after gw_upstream_get() returned GW_AGAIN for each: cb(wt, status, arg)
 * is called once, later, from the loop (see gw_upstream_wait_t), for the
 * first of them that frees a connection while usable. The call counts
 * towards the max_pending of one server: prefer when its queue has room,
 * else the lowest-numbered one of servers whose queue has room. GW_AGAIN
 * when none has (max_pending, 0: no queue): nothing is queued. expires_ms
 * (monotonic ms): when queue_timeout_ms ends (a call queued again after a
 * lost wake keeps its first). Places beyond the first are allocated into
 * wt on demand and kept until gw_upstream_wait_free().
 */
int gw_upstream_wait(gw_worker_t *w, const gw_backend_t *b, uint32_t servers, unsigned prefer, uint64_t expires_ms,
                     gw_upstream_wait_t *wt, gw_upstream_wait_cb cb, void *arg);
/* Takes wt off every queue it is in (O(1) each); cb will not be called.
 * Callers do this whenever they give up (timeout, deadline, client gone). */
void gw_upstream_wait_cancel(gw_upstream_wait_t *wt);
/* Cancels wt and frees the places it allocated (wt can be queued again). */
void gw_upstream_wait_free(gw_upstream_wait_t *wt);
static inline bool
gw_upstream_waiting(const gw_upstream_wait_t *wt)
{
    return wt->charged != NULL;
}

/* Installs the caller's callbacks and starts reading. drained (may be NULL)
 * is called when the output falls to low_water after a send that could
 * not write everything. */
void gw_upstream_setcb(gw_upstream_t *u, gw_upstream_cb read, gw_upstream_cb drained, gw_upstream_event_cb event,
                       void *arg, size_t low_water);

struct evbuffer *gw_upstream_input(gw_upstream_t *u);
struct evbuffer *gw_upstream_output(gw_upstream_t *u);
/* Writes what the output holds, now when the socket takes it. */
void gw_upstream_send(gw_upstream_t *u);
/* Stops or resumes reading (backpressure from a slow client). */
void gw_upstream_read(gw_upstream_t *u, bool on);

/* Gives u back: pooled when reusable (and fewer than max_idle are idle; by
 * default max_idle is max_connections, so a connection below the limits is
 * always kept), else closed. */
void gw_upstream_release(gw_upstream_t *u, bool reusable);

/* OpenSSL's new-session callback, installed on every backend SSL_CTX: keeps
 * the session in the pool of the connection that received it. */
int gw_upstream_tls_new_session(SSL *ssl, SSL_SESSION *sess);

/* Why the host name of u's server could not be resolved ("name does not
 * exist (NXDOMAIN)"); borrowed, valid until the next callback. */
const char *gw_upstream_resolve_error(const gw_upstream_t *u);

/* Whether a failed TLS connection failed in TLS (handshake, certificate)
 * rather than in TCP, and why, into buf. */
bool gw_upstream_tls_failed(gw_upstream_t *u);
const char *gw_upstream_tls_error(gw_upstream_t *u, char *buf, size_t len);

#endif
