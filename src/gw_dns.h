/*
 * gw_dns.h - host names in backend URLs, resolved by each worker with
 * libevent's evdns (never getaddrinfo(), which would block the worker).
 *
 * gw_dns_sys_t is what the files say: /etc/resolv.conf (when the
 * configuration names no nameservers) and the hosts file, read and parsed
 * once, on the main thread (at start-up, or by the reload that sets up the
 * first resolvers), and shared read-only by every worker's resolver.
 *
 * gw_dns_t is a worker's resolver: an evdns_base on the worker's event_base
 * with the configured nameservers (or those of resolv.conf) and the hosts
 * file's entries. It exists only when some backend URL has a host name.
 * Setting it up reads no file: it only opens the nameservers' sockets.
 *
 * gw_dns_name_t is what one worker knows about one name (one per
 * connection pool): every A and AAAA answer, used in turn (by requests,
 * gw_upstream.h; by health checks, gw_hcheck.h), kept for the
 * answer's TTL clamped to [min_ttl_ms, max_ttl_ms]. An expired answer is
 * still used while a background query refreshes it, so a request never waits
 * for a refresh when addresses are known. A failed resolution is remembered
 * for min_ttl_ms, so a dead name costs one query per worker per min_ttl_ms,
 * not one per request. A name found in the hosts file never reaches DNS.
 *
 * Everything here but gw_dns_sys_load runs on the worker's thread; the
 * only thing shared is the immutable gw_dns_sys_t.
 */
#ifndef GW_DNS_H
#define GW_DNS_H

#include "gw_core.h"

#include <sys/socket.h>

struct event_base;
typedef struct gw_dns_query_s gw_dns_query_t;

/* An address connections failed to reach is skipped for this long while
 * the name has other addresses (nginx's fail_timeout). */
#define GW_DNS_ADDR_DOWN_MS 10000

typedef struct {
    struct sockaddr_storage sa;    /* with the backend's port */
    socklen_t len;
    uint64_t down_until;           /* monotonic ms; skipped until then */
} gw_dns_addr_t;

/* Called when a query for n has ended, answered or failed (n's fields say
 * which), from an event callback of the worker's loop, never from inside a
 * gw_dns_* call. */
typedef void (*gw_dns_cb)(gw_dns_name_t *n, void *arg);

struct gw_dns_name_s {
    gw_dns_t *dns;
    const char *host;              /* borrowed from the backend */
    uint16_t port;
    gw_dns_addr_t *addrs;          /* A answers first, then AAAA */
    size_t naddrs;
    size_t next;                   /* round-robin position */
    unsigned gen;                  /* changes whenever addrs is replaced */
    uint64_t expires;              /* monotonic ms: answer (or failure) valid until; 0 = never asked */
    int ttl_ms;                    /* of the current answer, after clamping */
    bool from_hosts;               /* the addresses came from the hosts file */
    int err;                       /* DNS_ERR_* of the last resolution, 0 when it succeeded */
    char errtext[128];             /* what err means, for logs and errors */
    gw_dns_query_t *query;         /* in flight, or NULL */
    gw_dns_cb cb;
    void *arg;
};

/* Whether two "resolver" sections say the same (a, b borrowed). */
struct gw_resolver_conf_s;
bool gw_dns_conf_same(const struct gw_resolver_conf_s *a, const struct gw_resolver_conf_s *b);

/* Monotonic milliseconds (coarse clock: cheap enough for every request). */
uint64_t gw_dns_now_ms(void);

/* One line of a hosts file: a name and one of its addresses (port 0). */
typedef struct {
    char *name;
    struct sockaddr_storage sa;
    socklen_t len;
} gw_dns_host_t;

/* The parsed files (immutable once loaded; reference counted). */
typedef struct gw_dns_sys_s {
    int refs;                      /* atomic */
    /* resolv.conf, read only when the configuration names no nameservers
     * (then nns >= 1: 127.0.0.1 when the file names none, as the C library does) */
    struct sockaddr_storage ns[16]; /* port 53 unless given */
    socklen_t nslen[16];
    size_t nns;
    char *search[16];              /* "search" / "domain"; else the host name's domain */
    size_t nsearch;
    char *options[16];             /* "options" words with a value ("ndots:2"), for evdns */
    size_t noptions;
    /* the hosts file ("hosts_file"), when one is used */
    gw_dns_host_t *hosts;
    size_t nhosts;
} gw_dns_sys_t;

/*
 * Reads what cfg's "resolver" asks for: resolv_conf (NULL: /etc/resolv.conf)
 * unless it names nameservers, and its hosts_file. Main thread. A missing
 * file is logged and used as empty (resolv.conf: 127.0.0.1 then); a hosts
 * file that exists but cannot be read (a directory, no permission, an I/O
 * error) is an error: NULL with the reason in err. One reference.
 */
gw_dns_sys_t *gw_dns_sys_load(const gw_config_t *cfg, const char *resolv_conf, char *err, size_t errlen);
gw_dns_sys_t *gw_dns_sys_ref(gw_dns_sys_t *sys);
/* Drops a reference; NULL is ignored. */
void gw_dns_sys_unref(gw_dns_sys_t *sys);

/*
 * The resolver of one worker, on base: the nameservers of cfg, else those
 * of sys, and sys's hosts entries (sys: a reference is taken). Reads no
 * file. Runs on the thread that owns base (or before that thread runs).
 * cfg is borrowed and must outlive it. Returns NULL with a message in err
 * when evdns cannot be set up (no memory, no socket for a nameserver).
 * worker_id spreads the workers' round-robin starting points.
 */
gw_dns_t *gw_dns_new(struct event_base *base, const gw_config_t *cfg, gw_dns_sys_t *sys, int worker_id, char *err,
                     size_t errlen);

/* Frees the resolver after every name was freed: cancelled queries are
 * reaped (evdns calls them back even when cancelled), then evdns goes. */
void gw_dns_free(gw_dns_t *dns);

/* Sets up n for host:port (host borrowed); cb(n, arg) runs after each query. */
void gw_dns_name_init(gw_dns_name_t *n, gw_dns_t *dns, const char *host, uint16_t port, gw_dns_cb cb, void *arg);

/* Frees n's addresses and cancels its query: no callback will reach n. */
void gw_dns_name_free(gw_dns_name_t *n);

/*
 * The address for the next request (gw_upstream) or check (gw_hcheck), in
 * turn, skipping addresses marked down while others are up. Starts a query first when the answer expired
 * (the old addresses are still returned meanwhile). GW_OK with *out and
 * *idx set (*out valid until the next gw_dns_* call on n); GW_AGAIN when
 * there is no address yet and a query is in flight (cb will tell);
 * GW_ERR when the name failed to resolve within min_ttl_ms (errtext says
 * why).
 */
int gw_dns_name_pick(gw_dns_name_t *n, const gw_dns_addr_t **out, size_t *idx);

/* Starts a background query when the answer expired (no effect otherwise). */
void gw_dns_name_refresh(gw_dns_name_t *n);

/* A connection to address idx of generation gen failed: skip that address
 * for GW_DNS_ADDR_DOWN_MS (no effect when the addresses changed since). */
void gw_dns_name_mark_down(gw_dns_name_t *n, unsigned gen, size_t idx);

/* True when sa is one of n's current addresses. */
bool gw_dns_name_has(const gw_dns_name_t *n, const struct sockaddr *sa, socklen_t len);
/* The same, and *idx gets sa's index among them (unchanged when false). */
bool gw_dns_name_find(const gw_dns_name_t *n, const struct sockaddr *sa, socklen_t len, size_t *idx);

/* "127.0.0.1, [::1]" (the first few addresses of n), for log lines. */
const char *gw_dns_name_list(const gw_dns_name_t *n, char *buf, size_t len);

#endif
