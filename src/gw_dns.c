/*
 * gw_dns.c - host names of backends: a per-worker evdns resolver, the
 * hosts file, and per-pool address caches (see gw_dns.h).
 *
 * Why evdns_base_resolve_ipv4/ipv6 and not evdns_getaddrinfo: only the
 * former report the answer's TTL, which decides when to ask again. They do
 * not read the hosts file (evdns_getaddrinfo does, but gives no TTL), so
 * gatherd reads it itself and answers names found there ("localhost")
 * without DNS, valid for max_ttl_ms.
 *
 * Why gatherd parses resolv.conf itself instead of evdns_base_resolv_conf_parse():
 * that reads the file on the thread that sets up the resolver, once per
 * worker. gw_dns_sys_load reads both files once, on the main thread, and
 * every worker's resolver is set up from the parsed result: nothing on a
 * worker's loop touches the file system, and all workers see the same
 * files. The parser follows evdns's (and the C library's) reading of the
 * file: "nameserver", "domain", "search", "options".
 *
 * evdns calls every callback later, from the loop, even for a cancelled
 * request (with DNS_ERR_CANCEL). So the callback argument is a query object
 * that outlives its name: a name that goes away detaches from its query and
 * cancels it, and the query frees itself when both of its answers are in.
 * gw_dns_free() lets the cancelled callbacks run before freeing evdns.
 */
#include "gw_dns.h"
#include "gw_config.h"
#include "gw_log.h"

#include <arpa/inet.h>
#include <errno.h>
#include <event2/dns.h>
#include <event2/event.h>
#include <limits.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

/* The hosts file is read up to this many entries; a larger one is cut with
 * a warning (a hosts file that size is a mistake, not a configuration). */
#define HOSTS_MAX_ENTRIES 100000

#define RESOLV_CONF "/etc/resolv.conf"

struct gw_dns_s {
    struct event_base *base;
    struct evdns_base *evdns;
    gw_resolver_conf_t conf;       /* a copy without the pointers: it outlives a reloaded configuration */
    int worker_id;
    gw_dns_sys_t *sys;             /* one reference: the hosts entries */
    gw_dns_query_t *queries;       /* every query not yet reaped, doubly linked */
};

/* One resolution of one name: A and AAAA asked together. */
struct gw_dns_query_s {
    gw_dns_t *dns;
    gw_dns_name_t *owner;          /* NULL once the name is gone */
    struct evdns_request *req[2];  /* A, AAAA; NULL once that answer is in */
    int err[2];                    /* DNS_ERR_* of each answer */
    uint32_t a4[32];               /* evdns keeps at most 32 addresses per answer */
    size_t n4;
    unsigned char a6[32][16];
    size_t n6;
    int ttl;                       /* smallest TTL among the answers, seconds */
    gw_dns_query_t *prev, *next;
};

uint64_t
gw_dns_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

/* --- the hosts file ------------------------------------------------------- */

/* Compares host names ignoring case and a final dot. */
static bool
name_eq(const char *a, const char *b)
{
    size_t la = strlen(a), lb = strlen(b);
    if (la && a[la - 1] == '.')
        la--;
    if (lb && b[lb - 1] == '.')
        lb--;
    return la == lb && strncasecmp(a, b, la) == 0;
}

/* The next blank-separated word of *p (NUL-terminated in place), or NULL. */
static char *
next_word(char **p)
{
    char *s = *p + strspn(*p, " \t\r\n");
    if (*s == '\0')
        return NULL;
    char *e = s + strcspn(s, " \t\r\n");
    *p = *e ? e + 1 : e;
    *e = '\0';
    return s;
}

/* An IPv4 or IPv6 address (no scope, no port) with port; false when text is none. */
static bool
parse_ip(const char *text, uint16_t port, struct sockaddr_storage *sa, socklen_t *len)
{
    memset(sa, 0, sizeof(*sa));
    struct sockaddr_in *in4 = (struct sockaddr_in *)sa;
    struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)sa;
    if (inet_pton(AF_INET, text, &in4->sin_addr) == 1) {
        in4->sin_family = AF_INET;
        in4->sin_port = htons(port);
        *len = sizeof(*in4);
        return true;
    }
    if (inet_pton(AF_INET6, text, &in6->sin6_addr) == 1) {
        in6->sin6_family = AF_INET6;
        in6->sin6_port = htons(port);
        *len = sizeof(*in6);
        return true;
    }
    return false;
}

/* Reads path ("ADDRESS NAME [ALIAS...]" lines, '#' comments) into sys.
 * A missing file is not an error (a warning: there are simply no
 * entries); any other failure to read it is: GW_ERR with the reason. */
static int
hosts_load(gw_dns_sys_t *sys, const char *path, char *err, size_t errlen)
{
    FILE *f = fopen(path, "r");
    if (f == NULL && errno == ENOENT) {
        gw_log(GW_LOG_WARN, "resolver: no hosts file %s; names are resolved by DNS only", path);
        return GW_OK;
    }
    if (f == NULL) {
        snprintf(err, errlen, "resolver: cannot read the hosts file %s: %s", path, strerror(errno));
        return GW_ERR;
    }
    size_t cap = 0;
    char line[1024];
    while (fgets(line, sizeof(line), f) != NULL) {
        char *hash = strchr(line, '#');
        if (hash)
            *hash = '\0';
        char *cur = line;
        char *addr = next_word(&cur);
        if (addr == NULL)
            continue;
        struct sockaddr_storage sa;
        socklen_t len;
        if (!parse_ip(addr, 0, &sa, &len))
            continue; /* a scoped address ("fe80::1%eth0") or garbage: not usable */
        for (char *name = next_word(&cur); name; name = next_word(&cur)) {
            if (sys->nhosts >= HOSTS_MAX_ENTRIES) {
                gw_log(GW_LOG_WARN, "resolver: hosts file %s has more than %d entries; the rest is ignored", path,
                       HOSTS_MAX_ENTRIES);
                fclose(f);
                return GW_OK;
            }
            gw_grow((void **)&sys->hosts, &cap, sys->nhosts + 1, sizeof(gw_dns_host_t));
            gw_dns_host_t *e = &sys->hosts[sys->nhosts++];
            e->name = gw_strdup(name);
            e->sa = sa;
            e->len = len;
        }
    }
    /* fgets() ends on a read error as on the end of the file ("Is a directory") */
    int rc = GW_OK;
    if (ferror(f)) {
        snprintf(err, errlen, "resolver: cannot read the hosts file %s: %s", path, strerror(errno));
        rc = GW_ERR;
    }
    fclose(f);
    return rc;
}

/* --- resolv.conf -------------------------------------------------------- */

static void
add_word(char **list, size_t *n, size_t cap, const char *w)
{
    if (*n < cap)
        list[(*n)++] = gw_strdup(w);
}

/* The nameservers, search list and options of path into sys, as evdns
 * would read them; a file that cannot be read, or names no nameserver,
 * means 127.0.0.1 (with a warning). Without "search"/"domain", the domain
 * of the host name is the search list. */
static void
resolv_load(gw_dns_sys_t *sys, const char *path)
{
    FILE *f = fopen(path, "r");
    if (f == NULL) {
        gw_log(GW_LOG_WARN, "resolver: cannot read %s: %s; asking 127.0.0.1", path, strerror(errno));
    } else {
        char line[1024];
        while (fgets(line, sizeof(line), f) != NULL) {
            line[strcspn(line, "#;")] = '\0';
            char *cur = line;
            char *key = next_word(&cur);
            if (key == NULL)
                continue;
            if (strcmp(key, "nameserver") == 0) {
                char *addr = next_word(&cur);
                if (addr == NULL || sys->nns == GW_NELEM(sys->ns))
                    continue;
                if (parse_ip(addr, 53, &sys->ns[sys->nns], &sys->nslen[sys->nns]))
                    sys->nns++;
                else
                    gw_log(GW_LOG_WARN, "resolver: %s: nameserver \"%s\" is not an IP address; ignored", path, addr);
            } else if (strcmp(key, "domain") == 0 || strcmp(key, "search") == 0) {
                for (size_t i = 0; i < sys->nsearch; i++) /* the last such line wins */
                    free(sys->search[i]);
                sys->nsearch = 0;
                for (char *w = next_word(&cur); w; w = next_word(&cur)) {
                    add_word(sys->search, &sys->nsearch, GW_NELEM(sys->search), w);
                    if (key[0] == 'd')
                        break; /* "domain" has one */
                }
            } else if (strcmp(key, "options") == 0) {
                for (char *w = next_word(&cur); w; w = next_word(&cur))
                    if (strchr(w, ':') != NULL) /* "ndots:2"; words without a value mean nothing to evdns */
                        add_word(sys->options, &sys->noptions, GW_NELEM(sys->options), w);
            }
        }
        if (ferror(f))
            gw_log(GW_LOG_WARN, "resolver: error reading %s: %s; using what was read", path, strerror(errno));
        fclose(f);
        if (sys->nns == 0)
            gw_log(GW_LOG_WARN, "resolver: %s names no nameserver; asking 127.0.0.1", path);
    }
    if (sys->nns == 0) {
        parse_ip("127.0.0.1", 53, &sys->ns[0], &sys->nslen[0]);
        sys->nns = 1;
    }
    char host[256];
    const char *dot;
    if (sys->nsearch == 0 && gethostname(host, sizeof(host)) == 0 && (host[sizeof(host) - 1] = '\0', 1) &&
        (dot = strchr(host, '.')) != NULL && dot[1] != '\0')
        add_word(sys->search, &sys->nsearch, GW_NELEM(sys->search), dot + 1);
}

bool
gw_dns_conf_same(const gw_resolver_conf_t *a, const gw_resolver_conf_t *b)
{
    if (a->nnameservers != b->nnameservers || a->timeout_ms != b->timeout_ms || a->attempts != b->attempts ||
        a->min_ttl_ms != b->min_ttl_ms || a->max_ttl_ms != b->max_ttl_ms ||
        (a->hosts_file == NULL) != (b->hosts_file == NULL) ||
        (a->hosts_file && strcmp(a->hosts_file, b->hosts_file) != 0))
        return false;
    for (size_t i = 0; i < a->nnameservers; i++)
        if (a->nameservers[i].addrlen != b->nameservers[i].addrlen ||
            memcmp(&a->nameservers[i].addr, &b->nameservers[i].addr, a->nameservers[i].addrlen) != 0)
            return false;
    return true;
}

gw_dns_sys_t *
gw_dns_sys_load(const gw_config_t *cfg, const char *resolv_conf, char *err, size_t errlen)
{
    gw_dns_sys_t *sys = gw_calloc(1, sizeof(gw_dns_sys_t));
    sys->refs = 1;
    if (cfg->resolver.nnameservers == 0)
        resolv_load(sys, resolv_conf ? resolv_conf : RESOLV_CONF);
    if (cfg->resolver.hosts_file != NULL && hosts_load(sys, cfg->resolver.hosts_file, err, errlen) != GW_OK) {
        gw_dns_sys_unref(sys);
        return NULL;
    }
    return sys;
}

gw_dns_sys_t *
gw_dns_sys_ref(gw_dns_sys_t *sys)
{
    __atomic_add_fetch(&sys->refs, 1, __ATOMIC_RELAXED);
    return sys;
}

void
gw_dns_sys_unref(gw_dns_sys_t *sys)
{
    if (sys == NULL || __atomic_sub_fetch(&sys->refs, 1, __ATOMIC_ACQ_REL) != 0)
        return;
    for (size_t i = 0; i < sys->nsearch; i++)
        free(sys->search[i]);
    for (size_t i = 0; i < sys->noptions; i++)
        free(sys->options[i]);
    for (size_t i = 0; i < sys->nhosts; i++)
        free(sys->hosts[i].name);
    free(sys->hosts);
    free(sys);
}

/* Sets the port of an IPv4 or IPv6 address. */
static void
set_port(struct sockaddr_storage *sa, uint16_t port)
{
    if (sa->ss_family == AF_INET)
        ((struct sockaddr_in *)sa)->sin_port = htons(port);
    else
        ((struct sockaddr_in6 *)sa)->sin6_port = htons(port);
}

/* True when a and b are the same address and port. */
static bool
same_addr(const struct sockaddr_storage *a, socklen_t alen, const struct sockaddr *b, socklen_t blen)
{
    return alen == blen && memcmp(a, b, alen) == 0;
}

/* --- applying an answer -------------------------------------------------- */

/* Replaces n's addresses with the new ones (taken over), keeping the
 * down marks of addresses that stay. */
static void
set_addrs(gw_dns_name_t *n, gw_dns_addr_t *addrs, size_t count)
{
    bool same = count == n->naddrs;
    for (size_t i = 0; i < count; i++) {
        for (size_t k = 0; k < n->naddrs; k++)
            if (same_addr(&n->addrs[k].sa, n->addrs[k].len, (struct sockaddr *)&addrs[i].sa, addrs[i].len)) {
                addrs[i].down_until = n->addrs[k].down_until;
                break;
            }
        if (same && !same_addr(&n->addrs[i].sa, n->addrs[i].len, (struct sockaddr *)&addrs[i].sa, addrs[i].len))
            same = false;
    }
    free(n->addrs);
    n->addrs = addrs;
    n->naddrs = count;
    if (!same)
        n->gen++;
    n->next = count ? n->next % count : 0;
}

/* Looks host up in the hosts file; on a hit n gets its addresses, valid
 * for max_ttl_ms. */
static bool
from_hosts(gw_dns_name_t *n, uint64_t now)
{
    const gw_dns_sys_t *sys = n->dns->sys;
    size_t count = 0;
    gw_dns_addr_t *addrs = NULL;
    /* IPv4 entries first, as with DNS answers */
    for (int pass = 0; pass < 2; pass++)
        for (size_t i = 0; i < sys->nhosts; i++) {
            const gw_dns_host_t *e = &sys->hosts[i];
            if ((e->sa.ss_family == AF_INET) != (pass == 0) || !name_eq(e->name, n->host))
                continue;
            bool dup = false;
            for (size_t k = 0; k < count && !dup; k++)
                dup = addrs[k].len == e->len && memcmp(&addrs[k].sa, &e->sa, e->len) == 0;
            if (dup || count >= 64)
                continue;
            addrs = gw_realloc(addrs, (count + 1) * sizeof(gw_dns_addr_t));
            memset(&addrs[count], 0, sizeof(addrs[count]));
            addrs[count].sa = e->sa;
            addrs[count].len = e->len;
            count++;
        }
    if (count == 0)
        return false;
    for (size_t i = 0; i < count; i++)
        set_port(&addrs[i].sa, n->port);
    set_addrs(n, addrs, count);
    n->from_hosts = true;
    n->err = 0;
    n->errtext[0] = '\0';
    n->ttl_ms = n->dns->conf.max_ttl_ms;
    n->expires = now + (uint64_t)n->ttl_ms;
    return true;
}

/* The answers of q are all in: n takes them (or the failure) and is told. */
static void
apply(gw_dns_name_t *n, gw_dns_query_t *q)
{
    const gw_resolver_conf_t *conf = &n->dns->conf;
    uint64_t now = gw_dns_now_ms();
    size_t count = q->n4 + q->n6;
    if (count > 0) {
        gw_dns_addr_t *addrs = gw_calloc(count, sizeof(gw_dns_addr_t));
        for (size_t i = 0; i < q->n4; i++) {
            struct sockaddr_in *in4 = (struct sockaddr_in *)&addrs[i].sa;
            in4->sin_family = AF_INET;
            in4->sin_addr.s_addr = q->a4[i];
            addrs[i].len = sizeof(*in4);
        }
        for (size_t i = 0; i < q->n6; i++) {
            struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)&addrs[q->n4 + i].sa;
            in6->sin6_family = AF_INET6;
            memcpy(&in6->sin6_addr, q->a6[i], 16);
            addrs[q->n4 + i].len = sizeof(*in6);
        }
        for (size_t i = 0; i < count; i++)
            set_port(&addrs[i].sa, n->port);
        set_addrs(n, addrs, count);
        long long ttl = (long long)q->ttl * 1000;
        n->ttl_ms = (int)GW_MAX(GW_MIN(ttl, (long long)conf->max_ttl_ms), (long long)conf->min_ttl_ms);
        n->err = 0;
        n->errtext[0] = '\0';
    } else {
        /* "No such name" (from either question) beats "no such record",
         * which beats the first other error (a timeout, SERVFAIL, ...). */
        int e = DNS_ERR_UNKNOWN;
        if (q->err[0] == DNS_ERR_NOTEXIST || q->err[1] == DNS_ERR_NOTEXIST)
            e = DNS_ERR_NOTEXIST;
        else if (q->err[0] == DNS_ERR_NODATA && q->err[1] == DNS_ERR_NODATA)
            e = DNS_ERR_NODATA;
        else if (q->err[0] != DNS_ERR_NONE && q->err[0] != DNS_ERR_NODATA)
            e = q->err[0];
        else if (q->err[1] != DNS_ERR_NONE)
            e = q->err[1];
        /* An authoritative "no" ends the old addresses; an outage (timeout,
         * SERVFAIL, refused) does not: the last answer keeps serving until
         * a query succeeds (RFC 8767's serve-stale). */
        if (e == DNS_ERR_NOTEXIST || e == DNS_ERR_NODATA)
            set_addrs(n, NULL, 0);
        n->err = e;
        snprintf(n->errtext, sizeof(n->errtext), "%s", e == DNS_ERR_NODATA ? "no A or AAAA records"
                                                       : e == DNS_ERR_NOTEXIST ? "name does not exist (NXDOMAIN)"
                                                       : e == DNS_ERR_SERVERFAILED ? "server failure (SERVFAIL)"
                                                       : evdns_err_to_string(e));
        n->ttl_ms = conf->min_ttl_ms;
    }
    n->from_hosts = false;
    n->expires = now + (uint64_t)n->ttl_ms;
    n->cb(n, n->arg);
}

/* --- queries -------------------------------------------------------------- */

/* Takes q off its resolver's list of queries. */
static void
query_unlink(gw_dns_query_t *q)
{
    if (q->prev)
        q->prev->next = q->next;
    else
        q->dns->queries = q->next;
    if (q->next)
        q->next->prev = q->prev;
    q->prev = q->next = NULL;
}

/* One answer of q (slot 0: A, 1: AAAA) arrived, failed or was cancelled. */
static void
query_done(gw_dns_query_t *q, int slot, int result, int count, int ttl, const void *addresses)
{
    q->req[slot] = NULL; /* evdns frees its handle after this callback */
    q->err[slot] = result;
    if (result == DNS_ERR_NONE && count <= 0)
        q->err[slot] = DNS_ERR_NODATA;
    if (result == DNS_ERR_NONE && count > 0) {
        size_t n = (size_t)GW_MIN(count, 32);
        if (slot == 0) {
            memcpy(q->a4, addresses, n * 4);
            q->n4 = n;
        } else {
            memcpy(q->a6, addresses, n * 16);
            q->n6 = n;
        }
        q->ttl = GW_MIN(q->ttl, GW_MAX(ttl, 0));
    }
    if (q->req[0] || q->req[1])
        return; /* the other answer is still out */
    query_unlink(q);
    gw_dns_name_t *n = q->owner;
    if (n != NULL) {
        n->query = NULL;
        apply(n, q);
    }
    free(q);
}

/* evdns callbacks: the A answer, then (below) the AAAA answer, of query arg. */
static void
query_cb4(int result, char type, int count, int ttl, void *addresses, void *arg)
{
    GW_UNUSED(type);
    query_done(arg, 0, result, count, ttl, addresses);
}

static void
query_cb6(int result, char type, int count, int ttl, void *addresses, void *arg)
{
    GW_UNUSED(type);
    query_done(arg, 1, result, count, ttl, addresses);
}

/* Resolves n: from the hosts file at once, else a DNS query whose answer
 * comes through cb. A query that cannot even start is a failure kept for
 * min_ttl_ms. */
static void
resolve(gw_dns_name_t *n, uint64_t now)
{
    gw_dns_t *dns = n->dns;
    if (from_hosts(n, now))
        return;
    gw_dns_query_t *q = gw_calloc(1, sizeof(gw_dns_query_t));
    q->dns = dns;
    q->owner = n;
    q->ttl = INT_MAX;
    q->next = dns->queries;
    if (dns->queries)
        dns->queries->prev = q;
    dns->queries = q;
    /* Both callbacks come later, from the loop, so q is complete by then. */
    q->req[0] = evdns_base_resolve_ipv4(dns->evdns, n->host, 0, query_cb4, q);
    q->req[1] = evdns_base_resolve_ipv6(dns->evdns, n->host, 0, query_cb6, q);
    if (q->req[0] == NULL)
        q->err[0] = DNS_ERR_UNKNOWN;
    if (q->req[1] == NULL)
        q->err[1] = DNS_ERR_UNKNOWN;
    if (q->req[0] || q->req[1]) {
        n->query = q;
        return;
    }
    query_unlink(q);
    free(q);
    if (n->naddrs == 0) {
        n->err = DNS_ERR_UNKNOWN;
        snprintf(n->errtext, sizeof(n->errtext), "cannot start a DNS query");
    }
    gw_log_rl(GW_LOG_ERR, "resolver: cannot start a DNS query for %s", n->host);
    n->expires = now + (uint64_t)dns->conf.min_ttl_ms;
}

/* --- the public side ------------------------------------------------------ */

/* libevent's own messages, evdns's among them ("Nameserver 10.0.0.2:53 has
 * failed: request timed out"), go to gatherd's log with its levels instead
 * of bare "[msg]" lines on stderr. */
static void
libevent_log_cb(int severity, const char *msg)
{
    gw_log_level_t level = severity == EVENT_LOG_DEBUG ? GW_LOG_DEBUG
                           : severity == EVENT_LOG_MSG ? GW_LOG_INFO
                           : severity == EVENT_LOG_WARN ? GW_LOG_WARN : GW_LOG_ERR;
    if (level >= gw_log_get_level())
        gw_log_rl(level, "libevent: %s", msg);
}

static void
libevent_log_init(void)
{
    event_set_log_callback(libevent_log_cb); /* process-wide: set once, before any worker runs */
}

gw_dns_t *
gw_dns_new(struct event_base *base, const gw_config_t *cfg, gw_dns_sys_t *sys, int worker_id, char *err,
           size_t errlen)
{
    static pthread_once_t log_once = PTHREAD_ONCE_INIT;
    pthread_once(&log_once, libevent_log_init);
    const gw_resolver_conf_t *conf = &cfg->resolver;
    gw_dns_t *dns = gw_calloc(1, sizeof(gw_dns_t));
    dns->base = base;
    dns->worker_id = worker_id;
    /* Inactive: the resolver's socket is not watched between queries. */
    dns->evdns = evdns_base_new(base, EVDNS_BASE_DISABLE_WHEN_INACTIVE);
    if (dns->evdns == NULL) {
        snprintf(err, errlen, "cannot set up the DNS resolver (evdns)");
        free(dns);
        return NULL;
    }
    /* The configured nameservers, else the system's with its search list
     * and options, as getaddrinfo would use them (parsed by gw_dns_sys_load). */
    size_t nns = conf->nnameservers > 0 ? conf->nnameservers : sys->nns;
    for (size_t i = 0; i < nns; i++) {
        const struct sockaddr *sa = conf->nnameservers > 0 ? (const struct sockaddr *)&conf->nameservers[i].addr
                                                           : (const struct sockaddr *)&sys->ns[i];
        socklen_t salen = conf->nnameservers > 0 ? conf->nameservers[i].addrlen : sys->nslen[i];
        errno = 0;
        int rc = evdns_base_nameserver_sockaddr_add(dns->evdns, sa, salen, 0);
        if (rc != 0 && rc != 3) { /* 3: listed twice, which evdns refuses and the C library accepts */
            /* evdns opens the nameserver's socket here: EMFILE, or a family the host lacks */
            int e = errno;
            char ip[INET6_ADDRSTRLEN] = "?";
            inet_ntop(sa->sa_family,
                      sa->sa_family == AF_INET ? (const void *)&((const struct sockaddr_in *)sa)->sin_addr
                                               : (const void *)&((const struct sockaddr_in6 *)sa)->sin6_addr,
                      ip, sizeof(ip));
            snprintf(err, errlen, "resolver: cannot use nameserver %s: %s", ip,
                     e ? strerror(e) : "evdns cannot set it up");
            evdns_base_free(dns->evdns, 0);
            free(dns);
            return NULL;
        }
    }
    if (conf->nnameservers == 0) {
        for (size_t i = 0; i < sys->nsearch; i++)
            evdns_base_search_add(dns->evdns, sys->search[i]);
        for (size_t i = 0; i < sys->noptions; i++) {
            char opt[64];
            const char *colon = strchr(sys->options[i], ':');
            size_t klen = (size_t)(colon - sys->options[i]) + 1;
            if (klen >= sizeof(opt))
                continue;
            memcpy(opt, sys->options[i], klen);
            opt[klen] = '\0';
            evdns_base_set_option(dns->evdns, opt, colon + 1); /* unknown ones are ignored, as evdns does */
        }
    }
    /* The configuration's timeout and attempts win over resolv.conf's. */
    char val[32];
    snprintf(val, sizeof(val), "%d.%03d", conf->timeout_ms / 1000, conf->timeout_ms % 1000);
    evdns_base_set_option(dns->evdns, "timeout:", val);
    snprintf(val, sizeof(val), "%d", conf->attempts);
    evdns_base_set_option(dns->evdns, "attempts:", val);
    dns->sys = gw_dns_sys_ref(sys);
    dns->conf = *conf;
    dns->conf.nameservers = NULL;
    dns->conf.nnameservers = 0;
    dns->conf.hosts_file = NULL;
    return dns;
}

void
gw_dns_free(gw_dns_t *dns)
{
    if (dns == NULL)
        return;
    /* Cancelled (and already answered) queries still have callbacks queued
     * in the loop; one non-blocking pass runs them and they free
     * themselves. */
    if (dns->queries)
        event_base_loop(dns->base, EVLOOP_NONBLOCK);
    evdns_base_free(dns->evdns, 0);
    while (dns->queries) {
        gw_dns_query_t *q = dns->queries;
        query_unlink(q);
        free(q);
    }
    gw_dns_sys_unref(dns->sys);
    free(dns);
}

void
gw_dns_name_init(gw_dns_name_t *n, gw_dns_t *dns, const char *host, uint16_t port, gw_dns_cb cb, void *arg)
{
    memset(n, 0, sizeof(*n));
    n->dns = dns;
    n->host = host;
    n->port = port;
    n->cb = cb;
    n->arg = arg;
    n->next = (size_t)dns->worker_id;
}

void
gw_dns_name_free(gw_dns_name_t *n)
{
    gw_dns_query_t *q = n->query;
    if (q != NULL) {
        q->owner = NULL;
        n->query = NULL;
        for (int i = 0; i < 2; i++)
            if (q->req[i])
                evdns_cancel_request(n->dns->evdns, q->req[i]);
    }
    free(n->addrs);
    n->addrs = NULL;
    n->naddrs = 0;
}

void
gw_dns_name_refresh(gw_dns_name_t *n)
{
    if (n->query == NULL) {
        uint64_t now = gw_dns_now_ms();
        if (now >= n->expires)
            resolve(n, now);
    }
}

int
gw_dns_name_pick(gw_dns_name_t *n, const gw_dns_addr_t **out, size_t *idx)
{
    uint64_t now = gw_dns_now_ms();
    if (n->query == NULL && now >= n->expires)
        resolve(n, now);
    if (n->naddrs == 0)
        return n->query ? GW_AGAIN : GW_ERR;
    size_t i = n->next % n->naddrs;
    for (size_t k = 0; k < n->naddrs; k++) {
        size_t j = (n->next + k) % n->naddrs;
        if (n->addrs[j].down_until <= now) {
            i = j;
            break;
        }
    }
    n->next = i + 1;
    *out = &n->addrs[i];
    *idx = i;
    return GW_OK;
}

void
gw_dns_name_mark_down(gw_dns_name_t *n, unsigned gen, size_t idx)
{
    if (gen != n->gen || idx >= n->naddrs || n->naddrs < 2)
        return;
    n->addrs[idx].down_until = gw_dns_now_ms() + GW_DNS_ADDR_DOWN_MS;
}

bool
gw_dns_name_find(const gw_dns_name_t *n, const struct sockaddr *sa, socklen_t len, size_t *idx)
{
    for (size_t i = 0; i < n->naddrs; i++)
        if (same_addr(&n->addrs[i].sa, n->addrs[i].len, sa, len)) {
            *idx = i;
            return true;
        }
    return false;
}

bool
gw_dns_name_has(const gw_dns_name_t *n, const struct sockaddr *sa, socklen_t len)
{
    size_t idx;
    return gw_dns_name_find(n, sa, len, &idx);
}

const char *
gw_dns_name_list(const gw_dns_name_t *n, char *buf, size_t len)
{
    size_t w = 0;
    buf[0] = '\0';
    for (size_t i = 0; i < n->naddrs && i < 8 && w < len; i++) {
        char ip[INET6_ADDRSTRLEN];
        const struct sockaddr_storage *sa = &n->addrs[i].sa;
        if (sa->ss_family == AF_INET)
            inet_ntop(AF_INET, &((const struct sockaddr_in *)sa)->sin_addr, ip, sizeof(ip));
        else
            inet_ntop(AF_INET6, &((const struct sockaddr_in6 *)sa)->sin6_addr, ip, sizeof(ip));
        int k = snprintf(buf + w, len - w, "%s%s%s%s", w ? ", " : "", sa->ss_family == AF_INET6 ? "[" : "", ip,
                         sa->ss_family == AF_INET6 ? "]" : "");
        if (k < 0)
            break;
        w += (size_t)k;
    }
    if (n->naddrs > 8 && w < len)
        snprintf(buf + w, len - w, ", ... (%zu in all)", n->naddrs);
    return buf;
}
