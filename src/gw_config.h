/*
 * gw_config.h - the configuration: loaded from JSON (jansson), validated
 * strictly, then immutable and shared read-only by every worker thread.
 *
 * Lifetime: reference counted. gw_config_load() returns one reference;
 * every holder (server, worker, connection) takes its own with
 * gw_config_ref() and drops it with gw_config_unref(). A reload builds a new
 * object and publishes it; holders of the old one finish on it.
 */
#ifndef GW_CONFIG_H
#define GW_CONFIG_H

#include "gw_core.h"

#include <jansson.h>
#include <sys/socket.h>
#include <sys/types.h>

#define GW_CONF_MAX_WORKERS 256
/* The admin listener's address unless "admin": {"listen"} says otherwise:
 * loopback only, since /status and /metrics describe the backends. */
#define GW_ADMIN_DEFAULT_LISTEN "127.0.0.1:9180"

typedef struct {
    struct sockaddr_storage addr;
    socklen_t addrlen;
    char *text; /* as written, for logs */
} gw_listen_t;

typedef struct {
    int client_header_timeout_ms;
    int client_body_timeout_ms;
    int keepalive_timeout_ms;
    int send_timeout_ms;
    int lingering_timeout_ms;
    size_t max_header_bytes;
    size_t max_headers;
    size_t max_url_bytes;
    size_t max_body_bytes;
    unsigned max_keepalive_requests;
} gw_http_limits_t;

typedef struct {
    char *name;
    char *value;
} gw_kv_t;

/* An address block of "trusted_proxies" (see gw_realip.h). */
typedef struct {
    int family;              /* AF_INET or AF_INET6 */
    unsigned bits;           /* prefix length */
    unsigned char addr[16];  /* 4 bytes used for IPv4 */
} gw_cidr_t;

/* "real_ip_header": where a trusted proxy says who its client is. */
typedef enum { GW_REALIP_X_FORWARDED_FOR = 0, GW_REALIP_X_REAL_IP } gw_realip_header_t;

/* A route's "rate_limit" (see gw_ratelimit.h): settings and shared state. */
typedef struct gw_ratelimit_s gw_ratelimit_t;

/* The "resolver" section: how host names in backend URLs are resolved
 * (per worker, with evdns; see gw_dns.h). */
typedef struct gw_resolver_conf_s {
    gw_listen_t *nameservers;      /* none: the system's /etc/resolv.conf */
    size_t nnameservers;
    int timeout_ms;                /* per attempt */
    int attempts;                  /* sends of one query before it fails */
    int min_ttl_ms;                /* answers (and failures) are kept at least this long */
    int max_ttl_ms;                /* and at most this long; hosts-file answers this long */
    char *hosts_file;              /* looked up before DNS; NULL: not used */
} gw_resolver_conf_t;

/* A backend's "circuit_breaker" settings (gw_breaker.h); 0 disables a trigger. */
struct gw_breaker_conf_s {
    unsigned consecutive_failures; /* failures in a row that open it (default 5) */
    double failure_ratio;          /* failed share of the window that opens it (default 0.5) */
    int window_ms;                 /* the sliding window (default 10000) */
    unsigned min_requests;         /* calls in the window before the ratio counts (default 20) */
    int open_ms;                   /* first open time (default 5000), doubled per trip in a row */
    int max_open_ms;               /* up to this (default 60000) */
    unsigned probe_requests;       /* calls let through half-open (default 1) */
};

/* At most this many servers per backend: the request path keeps the servers
 * a call tried in a 32-bit mask. */
#define GW_CLUSTER_MAX_SERVERS 32
/* "health_check": "statuses" holds at most this many. */
#define GW_HC_MAX_STATUSES 16

/* A backend's "balance": how a try picks its server (gw_cluster.h). */
typedef enum {
    GW_BAL_RR = 0, /* "round_robin": smooth weighted round robin (nginx) */
    GW_BAL_LEAST,  /* "least_request": the better of two random servers by in-flight / weight (Envoy) */
    GW_BAL_HASH    /* "hash": a consistent-hash ring over hash_key; backups by round robin */
} gw_balance_t;

/* A backend's "health_check" (active checks, gw_hcheck.h). */
struct gw_hc_conf_s {
    char *path;                    /* "/healthz": starts with "/" */
    int interval_ms;               /* between checks of one server (default 2000), +-10% jitter */
    int timeout_ms;                /* one check: connect, send, status line (default 1000) */
    unsigned healthy;              /* successes in a row that make an unhealthy server healthy (default 2) */
    unsigned unhealthy;            /* failures in a row that make a healthy server unhealthy (default 3) */
    int statuses[GW_HC_MAX_STATUSES]; /* statuses that pass (default 200) */
    size_t nstatuses;
};

/* A backend's "outlier_detection" (passive, gw_cluster.h). */
typedef struct {
    bool enabled;                  /* the key is present */
    unsigned consecutive_failures; /* failures in a row that eject (default 5) */
    int eject_ms;                  /* first ejection (default 10000), doubled per ejection... */
    int max_eject_ms;              /* ... up to this (default 300000) */
    unsigned max_ejected_percent;  /* of the backend's servers, at most this share ejected (default 50) */
} gw_outlier_conf_t;

/* One server of a backend: "servers"[i], or the "url" shorthand (one
 * server). Immutable, owned by its backend, except hs's contents. */
struct gw_peer_s {
    char *url;                     /* as written */
    size_t index;                  /* in b->servers: its position in the configuration */
    unsigned weight;               /* 1..1000, default 1 */
    bool backup;                   /* gets traffic only when no primary is usable */
    struct sockaddr_storage addr;  /* an IP literal URL: the address; unused when host_name is set */
    socklen_t addrlen;
    char *host_name;               /* a host name URL: the name to resolve; NULL for an IP literal */
    uint16_t port;
    char *host_header;             /* "10.0.0.2:8080": Host sent to this server */
    char *tls_server_name;         /* SNI and certificate name: the backend's tls.server_name when set,
                                      else this URL's host */
    bool tls_name_is_ip;           /* check an IP SAN instead of a DNS name, and send no SNI */
    char *label;                   /* "10.0.0.2:8080" (host:port): log lines, metrics, status */
    char *conn_key;                /* what a connection to it depends on (URL, connect timeout, TLS
                                      settings): equal keys let a reload keep its pool */
    gw_hserver_t *hs;              /* its shared mutable state (gw_cluster.h); one reference */
    unsigned mid;                  /* its metrics slot (gw_metrics_bind): per-worker connection gauges */
};

/* A backend API. Immutable, owned by the configuration. */
struct gw_backend_s {
    char *name;
    /* The first server's (url, addr, addrlen, host_name, port, host_header,
     * tls_server_name, tls_name_is_ip, conn_key): the request path does not
     * pick servers yet. With "servers", url is the first server's URL. */
    char *url;
    size_t index;                  /* its position in cfg->backends: per-worker pools are indexed by it */
    struct sockaddr_storage addr;  /* an IP literal URL: the address; unused when host_name is set */
    socklen_t addrlen;
    char *host_name;               /* a host name URL: the name to resolve ("api.internal"); NULL for an IP */
    uint16_t port;
    char *host_header;             /* "127.0.0.1:9101": Host sent upstream */
    size_t max_response_bytes;     /* largest response body accepted from this backend */
    int connect_timeout_ms;
    int timeout_ms;                /* whole call: connect, send, response head and body */
    int idle_timeout_ms;           /* how long a pooled connection may stay idle */
    unsigned max_connections;      /* per worker: open connections to this backend */
    unsigned max_idle;             /* per worker: idle connections kept (default and at most max_connections) */
    /* TLS (https:// URLs) */
    bool tls;
    bool tls_verify;               /* false only by an explicit, logged opt-out */
    char *tls_server_name;         /* SNI and certificate name check; default the URL host */
    bool tls_name_is_ip;           /* check an IP SAN instead of a DNS name, and send no SNI */
    struct ssl_ctx_st *ssl_ctx;    /* shared by every worker (OpenSSL makes it thread-safe) */
    char *conn_key;                /* what a connection to it depends on (URL, connect timeout, TLS
                                      settings): equal keys let a reload keep the pools */
    /* The one mutable part: worker i's connection pool for server k of this
     * backend, pools[i * nservers + k], set and used by worker i's thread
     * only (see gw_upstream.h). [cfg->workers * nservers] */
    gw_pool_t **pools;
    /* resilience */
    unsigned max_pending;          /* per worker: calls waiting for a connection when max_connections are used (0: none) */
    int queue_timeout_ms;          /* longest wait in that queue */
    gw_breaker_conf_t breaker_conf; /* "circuit_breaker", when breaker is set */
    gw_breaker_t *breaker;         /* its shared mutable state (one reference); NULL: no breaker */
    struct gw_retry_conf_s *retry; /* "retry" (gw_retry.h); never NULL: attempts 1 when absent */
    unsigned mid;                  /* its metrics slot (gw_metrics_bind) */
    /* servers ("servers", or "url": one) */
    gw_peer_t *servers;            /* [nservers], in the order written; index = position */
    size_t nservers;               /* 1..GW_CLUSTER_MAX_SERVERS */
    size_t nprimary;               /* servers that are not backups */
    gw_balance_t balance;          /* "balance" */
    gw_tpl_t *hash_key;            /* "hash_key" (GW_TPL_HEADER, no route scope); set with GW_BAL_HASH only */
    gw_hc_conf_t *health_check;    /* "health_check"; NULL: no active checks */
    gw_outlier_conf_t outlier;     /* "outlier_detection"; outlier.enabled false: none */
    gw_cluster_t *cluster;         /* the balancer (gw_cluster.h): the hash ring and per-worker state */
};

typedef enum { GW_ROUTE_RESPOND = 1, GW_ROUTE_PROXY, GW_ROUTE_AGGREGATE } gw_route_kind_t;

/* A header a call adds: "headers": {"X-User": "{user.id}"}. */
typedef struct {
    char *name;     /* as written; a token, never one gatherd writes itself */
    gw_tpl_t *value; /* GW_TPL_HEADER template */
} gw_call_header_t;

/*
 * One backend call of an aggregate route ("routes[].calls[]"). Immutable,
 * owned by its route. Templates are compiled against the route's scope:
 * its path parameter names, its call names in list order (a call's index is
 * its dependency bit) and, for a foreach call, the item.
 */
struct gw_call_s {
    char *name;                  /* unique in the route: 1-64 of [A-Za-z0-9_-], not query/header/item */
    size_t index;                /* position in the route's calls */
    const gw_backend_t *backend; /* borrowed from the configuration */
    int method;                  /* llhttp method number; GET by default */
    gw_tpl_t *target;            /* "path": path and query, GW_TPL_TARGET */
    gw_call_header_t *headers;   /* "headers": added to the call, templated */
    size_t nheaders;
    char **forward_headers;      /* "forward_headers": client headers passed on (names as written) */
    size_t nforward;
    gw_tpl_json_t *body;         /* "body" as a JSON template; NULL: none (or forward_body) */
    bool forward_body;           /* "body": "forward": the client's body, with its Content-Type */
    int timeout_ms;              /* the whole call; the backend's timeout_ms unless set */
    int hedge_after_ms;          /* "hedge_after_ms": a second copy after this long; 0: none */
    struct gw_cache_scope_s *cache; /* "cache" / "coalesce" (gw_cache.h): one reference, kept by a reload
                                    when unchanged; NULL: neither */
    bool required;               /* its failure fails the request */
    json_t *fallback;            /* "fallback": put in its place when it fails; NULL: none. A
                                    present JSON null is json_null(). Owned reference. */
    char *group;                 /* its key in the aggregate; the name unless set */
    uint64_t deps;               /* calls that must finish first: from its templates, "after"
                                    and the foreach source; bit i = calls[i] */
    uint64_t reads;              /* the calls of deps whose answers it reads (not "after") */
    uint64_t needs;              /* the calls of deps whose skip skips it: templates, "after",
                                    foreach; not those only its "when" names (a skipped call is
                                    absent there) */
    /* "when": sent only when it holds (gw_cond.h); NULL: always */
    gw_cond_t *when;
    bool when_item;              /* it reads {item}: decided per element of a foreach call */
    json_t *skip_value;          /* "skip_value": put in its place when skipped; NULL: none. Owned. */
    /* "foreach": "orders.items": one request per element of that array */
    bool foreach;
    size_t foreach_call;         /* index of the call whose answer holds the array */
    gw_jpath_t *foreach_path;    /* the array inside that answer (the root for "orders") */
    unsigned foreach_concurrency; /* elements in flight at once (default 8) */
    unsigned foreach_max;        /* most elements; more fails the call with too_many_items (default 100) */
    char *into;                  /* "into": each element's result goes under this key of the element
                                    in the source's answer; the call has no key of its own. NULL: none */
    /* "batch": one request per chunk of the unique values found at "from" (gw_batch.h);
       foreach_call and foreach_path are the array's place, into its "into"; foreach is false */
    gw_batch_t *batch;
    /* shaping of the answer, in this order */
    gw_jpath_t *target_path;     /* "target": the value to keep; NULL: the whole answer */
    gw_jpath_sel_t *allow;       /* "allow": keep only these paths; NULL: none */
    gw_jpath_sel_t *deny;        /* "deny": remove these paths; NULL: none (never both) */
    gw_kv_t *rename;             /* "rename": top-level key old -> new, in the order written */
    size_t nrename;
};

typedef enum { GW_MERGE_GROUP = 0, GW_MERGE_MERGE } gw_merge_t;

struct gw_route_s {
    char *pattern;   /* as written: "/users/{id}" */
    char *where;     /* "conf/gatherd.json: routes[2]", for messages */
    uint64_t methods; /* bit (1 << llhttp method); ~0 = any */
    gw_route_kind_t kind;
    struct {
        int status;
        char *head;       /* header lines "Name: value\r\n", Content-Type included */
        size_t head_len;
        char *body;       /* serialized JSON */
        size_t body_len;
    } respond;
    struct {
        const gw_backend_t *backend; /* borrowed from the configuration */
        size_t strip_segments;       /* leading path segments removed upstream */
        bool preserve_host;
        int64_t max_body_bytes;      /* streamed request bodies; -1: http.max_body_bytes; INT64_MAX: none */
    } proxy;
    struct {
        gw_call_t **calls;           /* 1..GW_TPL_MAX_CALLS, in the order written */
        size_t ncalls;
        int deadline_ms;             /* the whole request (default 5000) */
        gw_merge_t merge;            /* "merge": "group" (default) or "merge" */
        bool errors;                 /* "errors": true adds "_errors" to degraded answers */
        uint64_t read;               /* calls whose answers other calls read (templates, foreach, when) */
        uint64_t enriched;           /* calls whose answers calls with "into" put results into */
        bool uses_body;              /* a call forwards the client's body ("body": "forward"); else
                                        the body is read and dropped (templates cannot see it) */
        char **params;               /* the pattern's parameter names, in order */
        size_t nparams;
    } agg;
    gw_ratelimit_t *ratelimit; /* "rate_limit": one reference, shared across reloads; NULL: none */
    unsigned mid;              /* its metrics slot (gw_metrics_bind) */
};

/* "log": the error log and the access log (gw_log.h, gw_alog.h). */
typedef enum { GW_ALOG_COMBINED = 0, GW_ALOG_JSON } gw_alog_format_t;
typedef struct {
    int level;                     /* gw_log_level_t; default notice */
    char *error_path;              /* "error_log" file; NULL: stderr */
    bool access_on;                /* "access_log" is not "off" */
    char *access_path;             /* its file; NULL: stderr (when on) */
    gw_alog_format_t access_format;
} gw_log_conf_t;

struct gw_config_s {
    int refcnt; /* atomic */
    char *file;
    gw_listen_t *listen;
    size_t nlisten;
    int workers;
    int workers_conf;               /* what the file asks for ("auto": the CPUs), before -w */
    unsigned max_connections;
    int shutdown_timeout_ms;
    char *pid_file;                 /* "pid_file": written at start, removed at exit; NULL: none */
    gw_http_limits_t http;
    struct {
        size_t request_body_bytes;  /* "memory.request_body_bytes": gw_budget_bodies */
        size_t response_body_bytes; /* "memory.response_body_bytes": gw_budget_responses */
    } memory;
    struct {
        size_t max_bytes;           /* "cache.max_bytes": the answer cache of calls (gw_cache.h) */
    } cache;
    struct {
        unsigned threads;           /* "thread_pool.threads": gw_tpool.h; fixed at start */
        unsigned max_queue;         /* "thread_pool.max_queue" */
    } thread_pool;
    gw_route_t **routes;
    size_t nroutes;
    gw_backend_t **backends;
    size_t nbackends;
    size_t nnamed;                  /* backends with a host name: a resolver is needed */
    gw_resolver_conf_t resolver;
    gw_router_t *router;
    gw_cidr_t *trusted_proxies;     /* "trusted_proxies" (see gw_realip.h) */
    size_t ntrusted;
    gw_realip_header_t real_ip_header;
    unsigned max_inflight;          /* requests being handled, whole process; 0: no limit */
    gw_log_conf_t log;              /* "log" */
    gw_listen_t *admin_listen;      /* "admin": {"listen"}: the admin listener (gw_admin.h) */
    size_t nadmin;                  /* 0: none */
    char *user;                     /* "user": run as this account after binding (gw_daemon.h); NULL: stay */
    char *group;                    /* "group": its group; NULL: the user's primary group */
    uid_t uid;                      /* resolved when the file is read: "-t" reports an unknown name */
    gid_t gid;
};

/*
 * Reads, validates and compiles FILE. Returns a new configuration with one
 * reference, or NULL with a message in err ("FILE:LINE: PATH: what").
 * workers_override > 0 replaces the "workers" setting.
 */
gw_config_t *gw_config_load(const char *file, int workers_override, char *err, size_t errlen);

/* Same, from text in memory; name is used in messages, basedir for includes. */
gw_config_t *gw_config_parse(const char *text, const char *name, const char *basedir, int workers_override,
                             char *err, size_t errlen);

gw_config_t *gw_config_ref(gw_config_t *cfg);
/* Whether connections made for backend a can serve backend b (a reload keeps
 * the pool of such a backend, with its idle connections). */
bool gw_config_backend_same_connection(const gw_backend_t *a, const gw_backend_t *b);
void gw_config_unref(gw_config_t *cfg);

/* Method name ("GET") to llhttp method number, or -1 for an unsupported one. */
int gw_config_method_from_name(const char *name);

#endif
