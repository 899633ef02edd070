/*
 * gw_config.c - reads the JSON configuration with jansson and validates it
 * strictly: unknown keys, wrong types, out-of-range numbers, bad addresses
 * and duplicate routes are errors. A syntax error names file, line and
 * column (from jansson); every other error names the file, the line found
 * by re-scanning the text, and the JSON path ("routes[3].respond.status").
 *
 * Included files ("include": ["conf.d/NAME.json"], globs allowed, relative to the including
 * file) may hold "routes" only; their errors name the included file.
 *
 * Aggregate routes ("calls") are compiled completely at load: templates and
 * JSON paths, call names resolved to indexes, dependency masks checked for
 * cycles (see "aggregate routes" below).
 */
#include "gw_cache.h"
#include "gw_config.h"
#include "gw_batch.h"
#include "gw_cond.h"
#include "gw_breaker.h"
#include "gw_cluster.h"
#include "gw_http.h"
#include "gw_jpath.h"
#include "gw_log.h"
#include "gw_ratelimit.h"
#include "gw_realip.h"
#include "gw_retry.h"
#include "gw_router.h"
#include "gw_template.h"
#include "gw_upstream.h"

#include <arpa/inet.h>
#include <errno.h>
#include <event2/util.h>
#include <glob.h>
#include <grp.h>
#include <jansson.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <llhttp.h>
#include <netinet/in.h>
#include <pwd.h>
#include <sched.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#define MAX_DEPTH 16

typedef struct {
    const char *key; /* NULL for an array index */
    size_t index;
} comp_t;

/* Validation context for one file. */
typedef struct {
    const char *name;
    const char *text;
    const char *basedir;
    comp_t path[MAX_DEPTH];
    size_t depth;
    char *err;
    size_t errlen;
    gw_config_t *cfg;
} ctx_t;

/* --- finding the line of a JSON path in the source text ----------------- */

static const char *
skip_ws(const char *p)
{
    while (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r')
        p++;
    return p;
}

static const char *
skip_string(const char *p)
{
    for (p++; *p && *p != '"'; p++)
        if (*p == '\\' && p[1])
            p++;
    return *p ? p + 1 : NULL;
}

static const char *
skip_value(const char *p)
{
    p = skip_ws(p);
    if (*p == '"')
        return skip_string(p);
    if (*p == '{' || *p == '[') {
        int depth = 0;
        for (; *p; p++) {
            if (*p == '"') {
                p = skip_string(p);
                if (p == NULL)
                    return NULL;
                p--;
            } else if (*p == '{' || *p == '[') {
                depth++;
            } else if (*p == '}' || *p == ']') {
                if (--depth == 0)
                    return p + 1;
            }
        }
        return NULL;
    }
    while (*p && *p != ',' && *p != '}' && *p != ']' && *p != ' ' && *p != '\n' && *p != '\r' && *p != '\t')
        p++;
    return p;
}

/* Returns the position of the value at path[0..n) (or of the key when
 * key_of_last), or NULL when it cannot be found. */
static const char *
locate(const char *text, const comp_t *path, size_t n, bool key_of_last)
{
    const char *p = skip_ws(text);
    for (size_t d = 0; d < n && p; d++) {
        if (path[d].key != NULL) {
            if (*p != '{')
                return NULL;
            p = skip_ws(p + 1);
            size_t klen = strlen(path[d].key);
            for (;;) {
                if (*p != '"')
                    return NULL;
                const char *kstart = p;
                const char *kend = skip_string(p);
                if (kend == NULL)
                    return NULL;
                bool hit = (size_t)(kend - kstart - 2) == klen && memcmp(kstart + 1, path[d].key, klen) == 0;
                p = skip_ws(kend);
                if (*p != ':')
                    return NULL;
                p = skip_ws(p + 1);
                if (hit) {
                    if (key_of_last && d == n - 1)
                        return kstart;
                    break;
                }
                p = skip_ws(skip_value(p));
                if (p == NULL || *p != ',')
                    return NULL;
                p = skip_ws(p + 1);
            }
        } else {
            if (*p != '[')
                return NULL;
            p = skip_ws(p + 1);
            for (size_t i = 0; i < path[d].index; i++) {
                p = skip_value(p);
                if (p == NULL)
                    return NULL;
                p = skip_ws(p);
                if (*p != ',')
                    return NULL;
                p = skip_ws(p + 1);
            }
        }
    }
    return p;
}

static int
line_of(const char *text, const char *pos)
{
    int line = 1;
    for (const char *p = text; p < pos; p++)
        if (*p == '\n')
            line++;
    return line;
}

static size_t
format_path(const ctx_t *c, size_t n, char *buf, size_t len)
{
    size_t w = 0;
    buf[0] = '\0';
    for (size_t d = 0; d < n && w < len; d++) {
        int k;
        if (c->path[d].key)
            k = snprintf(buf + w, len - w, "%s%s", w ? "." : "", c->path[d].key);
        else
            k = snprintf(buf + w, len - w, "[%zu]", c->path[d].index);
        if (k < 0)
            break;
        w += (size_t)k;
    }
    return w;
}

static void __attribute__((format(printf, 3, 0)))
vfail_at(ctx_t *c, bool on_key, const char *fmt, va_list ap)
{
    char path[512], msg[768];
    format_path(c, c->depth, path, sizeof(path));
    vsnprintf(msg, sizeof(msg), fmt, ap);
    const char *pos = locate(c->text, c->path, c->depth, on_key);
    char where[64] = "";
    if (pos != NULL)
        snprintf(where, sizeof(where), ":%d", line_of(c->text, pos));
    snprintf(c->err, c->errlen, "%s%s: %s%s%s", c->name, where, path, path[0] ? ": " : "", msg);
}

/* Reports an error at the current path (at its key when on_key). */
static int __attribute__((format(printf, 3, 4)))
fail_at(ctx_t *c, bool on_key, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vfail_at(c, on_key, fmt, ap);
    va_end(ap);
    return GW_ERR;
}

#define fail(c, ...) fail_at(c, false, __VA_ARGS__)

static void
push_key(ctx_t *c, const char *key)
{
    if (c->depth < MAX_DEPTH)
        c->path[c->depth].key = key;
    c->depth++;
}

static void
push_index(ctx_t *c, size_t i)
{
    if (c->depth < MAX_DEPTH) {
        c->path[c->depth].key = NULL;
        c->path[c->depth].index = i;
    }
    c->depth++;
}

static void
pop(ctx_t *c)
{
    c->depth--;
}

/* Reports an error at key inside the current path, with the line of the key. */
static int __attribute__((format(printf, 3, 4)))
fail_in(ctx_t *c, const char *key, const char *fmt, ...)
{
    push_key(c, key);
    va_list ap;
    va_start(ap, fmt);
    vfail_at(c, true, fmt, ap);
    va_end(ap);
    pop(c);
    return GW_ERR;
}

static const char *
type_name(const json_t *v)
{
    switch (json_typeof(v)) {
    case JSON_OBJECT: return "an object";
    case JSON_ARRAY: return "an array";
    case JSON_STRING: return "a string";
    case JSON_INTEGER: return "an integer";
    case JSON_REAL: return "a number";
    case JSON_TRUE:
    case JSON_FALSE: return "a boolean";
    default: return "null";
    }
}

/* Every key of obj must be one of allowed (NULL-terminated). */
static int
check_keys(ctx_t *c, json_t *obj, const char *const *allowed, const char *what)
{
    const char *key;
    json_t *v;
    json_object_foreach(obj, key, v) {
        bool ok = false;
        for (const char *const *a = allowed; *a; a++)
            if (strcmp(*a, key) == 0)
                ok = true;
        if (!ok) {
            push_key(c, key);
            fail_at(c, true, "unknown key \"%s\" in %s", key, what);
            pop(c);
            return GW_ERR;
        }
    }
    return GW_OK;
}

static int
get_int(ctx_t *c, json_t *obj, const char *key, long long min, long long max, long long *out)
{
    json_t *v = json_object_get(obj, key);
    if (v == NULL)
        return GW_OK; /* keep the default */
    push_key(c, key);
    int rc = GW_OK;
    if (!json_is_integer(v))
        rc = fail(c, "must be an integer, not %s", type_name(v));
    else if (json_integer_value(v) < min || json_integer_value(v) > max)
        rc = fail(c, "must be between %lld and %lld, not %lld", min, max, (long long)json_integer_value(v));
    else
        *out = json_integer_value(v);
    pop(c);
    return rc;
}

static int
get_ms(ctx_t *c, json_t *obj, const char *key, int *out)
{
    long long v = *out;
    if (get_int(c, obj, key, 1, 86400000, &v) != GW_OK)
        return GW_ERR;
    *out = (int)v;
    return GW_OK;
}

static int
get_size(ctx_t *c, json_t *obj, const char *key, long long min, long long max, size_t *out)
{
    long long v = (long long)*out;
    if (get_int(c, obj, key, min, max, &v) != GW_OK)
        return GW_ERR;
    *out = (size_t)v;
    return GW_OK;
}

/* --- sections ------------------------------------------------------------ */

static int
parse_addr(const char *s, gw_listen_t *l)
{
    char host[128];
    const char *port;
    memset(&l->addr, 0, sizeof(l->addr));
    if (s[0] == '[') {
        const char *e = strchr(s, ']');
        if (e == NULL || e[1] != ':' || (size_t)(e - s - 1) >= sizeof(host))
            return GW_ERR;
        memcpy(host, s + 1, (size_t)(e - s - 1));
        host[e - s - 1] = '\0';
        port = e + 2;
    } else {
        const char *colon = strrchr(s, ':');
        if (colon == NULL) {
            snprintf(host, sizeof(host), "*");
            port = s;
        } else {
            if ((size_t)(colon - s) >= sizeof(host) || strchr(s, ':') != colon)
                return GW_ERR;
            memcpy(host, s, (size_t)(colon - s));
            host[colon - s] = '\0';
            port = colon + 1;
        }
    }
    char *end;
    errno = 0;
    long p = strtol(port, &end, 10);
    if (*port == '\0' || *end != '\0' || errno || p < 1 || p > 65535 || !(port[0] >= '0' && port[0] <= '9'))
        return GW_ERR;
    struct sockaddr_in *in4 = (struct sockaddr_in *)&l->addr;
    struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)&l->addr;
    if (strcmp(host, "*") == 0 || host[0] == '\0') {
        in4->sin_family = AF_INET;
        in4->sin_addr.s_addr = htonl(INADDR_ANY);
        in4->sin_port = htons((uint16_t)p);
        l->addrlen = sizeof(*in4);
    } else if (inet_pton(AF_INET, host, &in4->sin_addr) == 1 && s[0] != '[') {
        in4->sin_family = AF_INET;
        in4->sin_port = htons((uint16_t)p);
        l->addrlen = sizeof(*in4);
    } else if (s[0] == '[' && inet_pton(AF_INET6, host, &in6->sin6_addr) == 1) {
        in6->sin6_family = AF_INET6;
        in6->sin6_port = htons((uint16_t)p);
        l->addrlen = sizeof(*in6);
    } else {
        return GW_ERR;
    }
    return GW_OK;
}

/* A list of addresses (a single string is a list of one) into *out, *n.
 * Empty only when may_be_empty. */
static int
parse_addrs(ctx_t *c, json_t *v, bool may_be_empty, gw_listen_t **out, size_t *nout)
{
    if (json_is_string(v)) {
        /* a single address is accepted as a shorthand for a list of one */
    } else if (!json_is_array(v) || (json_array_size(v) == 0 && !may_be_empty)) {
        return fail(c, "must be a %sarray of addresses like \"127.0.0.1:8080\" or \"[::1]:8080\"",
                    may_be_empty ? "" : "non-empty ");
    }
    size_t n = json_is_string(v) ? 1 : json_array_size(v);
    *out = gw_calloc(n ? n : 1, sizeof(gw_listen_t));
    gw_listen_t *l = *out;
    for (size_t i = 0; i < n; i++) {
        json_t *a = json_is_string(v) ? v : json_array_get(v, i);
        if (!json_is_string(v))
            push_index(c, i);
        int rc = GW_OK;
        if (!json_is_string(a))
            rc = fail(c, "must be a string, not %s", type_name(a));
        else if (parse_addr(json_string_value(a), &l[i]) != GW_OK)
            rc = fail(c, "bad address \"%s\" (expected IPv4:PORT, [IPv6]:PORT, *:PORT or PORT)",
                      json_string_value(a));
        if (rc == GW_OK) {
            l[i].text = gw_strdup(json_string_value(a));
            *nout = i + 1;
            for (size_t k = 0; k < i; k++)
                if (l[k].addrlen == l[i].addrlen && memcmp(&l[k].addr, &l[i].addr, l[i].addrlen) == 0)
                    rc = fail(c, "address \"%s\" is listed twice", l[i].text);
        }
        if (!json_is_string(v))
            pop(c);
        if (rc != GW_OK)
            return rc;
    }
    return GW_OK;
}

static int
parse_listen(ctx_t *c, json_t *v)
{
    push_key(c, "listen");
    int rc = parse_addrs(c, v, false, &c->cfg->listen, &c->cfg->nlisten);
    pop(c);
    return rc;
}

/* "admin": {"listen": ...}: the admin listener (gw_admin.h); an empty list
 * turns it off. It may not share an address with "listen". */
static int
parse_admin(ctx_t *c, json_t *v)
{
    static const char *const keys[] = { "listen", NULL };
    gw_config_t *cfg = c->cfg;
    push_key(c, "admin");
    int rc = GW_ERR;
    json_t *l;
    if (!json_is_object(v)) {
        fail(c, "must be an object like {\"listen\": \"127.0.0.1:9180\"}");
        goto out;
    }
    if (check_keys(c, v, keys, "\"admin\""))
        goto out;
    if ((l = json_object_get(v, "listen")) != NULL) {
        for (size_t i = 0; i < cfg->nadmin; i++)
            free(cfg->admin_listen[i].text);
        free(cfg->admin_listen);
        cfg->admin_listen = NULL;
        cfg->nadmin = 0;
        push_key(c, "listen");
        rc = parse_addrs(c, l, true, &cfg->admin_listen, &cfg->nadmin);
        for (size_t i = 0; rc == GW_OK && i < cfg->nadmin; i++)
            for (size_t k = 0; k < cfg->nlisten; k++)
                if (cfg->listen[k].addrlen == cfg->admin_listen[i].addrlen &&
                    memcmp(&cfg->listen[k].addr, &cfg->admin_listen[i].addr, cfg->listen[k].addrlen) == 0)
                    rc = fail(c, "address \"%s\" is also in \"listen\"", cfg->admin_listen[i].text);
        pop(c);
        if (rc != GW_OK)
            goto out;
    }
    rc = GW_OK;
out:
    pop(c);
    return rc;
}

/* A non-empty string without NUL bytes at key; NULL with a message otherwise. */
static const char *
get_name(ctx_t *c, json_t *v, const char *key, const char *example)
{
    if (!json_is_string(v) || json_string_length(v) == 0 || strlen(json_string_value(v)) != json_string_length(v)) {
        fail_in(c, key, "must be a name like \"%s\" or a number", example);
        return NULL;
    }
    return json_string_value(v);
}

/* A decimal id ("65534"); false for anything else. */
static bool
numeric_id(const char *s, unsigned long *id)
{
    char *end;
    errno = 0;
    *id = strtoul(s, &end, 10);
    return s[0] >= '0' && s[0] <= '9' && *end == '\0' && errno == 0 && *id < 0xffffffffUL;
}

/* "user" and "group": resolved now, so "-t" names an account that does not
 * exist; the switch itself happens after binding (gw_daemon.h). A numeric
 * user needs no passwd entry (containers run as bare uids); its group is
 * then the same number unless "group" says otherwise. */
static int
parse_user(ctx_t *c, json_t *root)
{
    gw_config_t *cfg = c->cfg;
    json_t *uv = json_object_get(root, "user"), *gv = json_object_get(root, "group");
    const char *user = NULL, *group = NULL;
    if (uv && (user = get_name(c, uv, "user", "gatherd")) == NULL)
        return GW_ERR;
    if (gv && (group = get_name(c, gv, "group", "gatherd")) == NULL)
        return GW_ERR;
    if (user == NULL) {
        if (group)
            return fail_in(c, "group", "needs \"user\" as well");
        return GW_OK;
    }
    unsigned long id;
    struct passwd *pw = getpwnam(user);
    if (pw) {
        cfg->uid = pw->pw_uid;
        cfg->gid = pw->pw_gid;
    } else if (numeric_id(user, &id)) {
        cfg->uid = (uid_t)id;
        cfg->gid = (gid_t)id;
    } else
        return fail_in(c, "user", "no such user \"%s\"", user);
    if (group) {
        struct group *gr = getgrnam(group);
        if (gr)
            cfg->gid = gr->gr_gid;
        else if (numeric_id(group, &id))
            cfg->gid = (gid_t)id;
        else
            return fail_in(c, "group", "no such group \"%s\"", group);
    }
    cfg->user = gw_strdup(user);
    cfg->group = group ? gw_strdup(group) : NULL;
    return GW_OK;
}

static int
cpu_count(void)
{
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) == 0 && CPU_COUNT(&set) > 0)
        return CPU_COUNT(&set);
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (int)n : 1;
}

static int
parse_workers(ctx_t *c, json_t *v)
{
    push_key(c, "workers");
    int rc = GW_OK;
    if (json_is_string(v) && strcmp(json_string_value(v), "auto") == 0)
        c->cfg->workers = GW_MIN(cpu_count(), GW_CONF_MAX_WORKERS);
    else if (json_is_integer(v) && json_integer_value(v) >= 1 && json_integer_value(v) <= GW_CONF_MAX_WORKERS)
        c->cfg->workers = (int)json_integer_value(v);
    else
        rc = fail(c, "must be \"auto\" or an integer between 1 and %d", GW_CONF_MAX_WORKERS);
    pop(c);
    return rc;
}

static int
parse_http(ctx_t *c, json_t *v)
{
    static const char *const keys[] = { "client_header_timeout_ms", "client_body_timeout_ms", "keepalive_timeout_ms",
                                        "send_timeout_ms", "lingering_timeout_ms", "max_header_bytes",
                                        "max_headers", "max_url_bytes", "max_body_bytes",
                                        "max_keepalive_requests", NULL };
    gw_http_limits_t *h = &c->cfg->http;
    push_key(c, "http");
    int rc = GW_ERR;
    if (!json_is_object(v)) {
        rc = fail(c, "must be an object");
        goto out;
    }
    size_t maxreq = h->max_keepalive_requests;
    if (check_keys(c, v, keys, "\"http\"") || get_ms(c, v, "client_header_timeout_ms", &h->client_header_timeout_ms) ||
        get_ms(c, v, "client_body_timeout_ms", &h->client_body_timeout_ms) ||
        get_ms(c, v, "keepalive_timeout_ms", &h->keepalive_timeout_ms) ||
        get_ms(c, v, "send_timeout_ms", &h->send_timeout_ms) ||
        get_ms(c, v, "lingering_timeout_ms", &h->lingering_timeout_ms) ||
        get_size(c, v, "max_header_bytes", 256, 1 << 20, &h->max_header_bytes) ||
        get_size(c, v, "max_headers", 1, 1000, &h->max_headers) ||
        get_size(c, v, "max_url_bytes", 16, 1 << 20, &h->max_url_bytes) ||
        get_size(c, v, "max_body_bytes", 0, 1LL << 40, &h->max_body_bytes) ||
        get_size(c, v, "max_keepalive_requests", 1, 1000000000, &maxreq))
        goto out;
    h->max_keepalive_requests = (unsigned)maxreq;
    rc = GW_OK;
out:
    pop(c);
    return rc;
}

/* "memory": the process-wide budgets of buffered bytes (gw_budget.h). */
static int
parse_memory(ctx_t *c, json_t *v)
{
    static const char *const keys[] = { "request_body_bytes", "response_body_bytes", NULL };
    push_key(c, "memory");
    int rc = GW_ERR;
    if (!json_is_object(v)) {
        rc = fail(c, "must be an object");
        goto out;
    }
    if (check_keys(c, v, keys, "\"memory\"") ||
        get_size(c, v, "request_body_bytes", 0, 1LL << 40, &c->cfg->memory.request_body_bytes) ||
        get_size(c, v, "response_body_bytes", 0, 1LL << 40, &c->cfg->memory.response_body_bytes))
        goto out;
    rc = GW_OK;
out:
    pop(c);
    return rc;
}

/* "cache": the process-wide answer cache of calls (gw_cache.h). */
static int
parse_cache(ctx_t *c, json_t *v)
{
    static const char *const keys[] = { "max_bytes", NULL };
    push_key(c, "cache");
    int rc = GW_ERR;
    if (!json_is_object(v)) {
        rc = fail(c, "must be an object like {\"max_bytes\": 67108864}");
        goto out;
    }
    if (check_keys(c, v, keys, "\"cache\"") || get_size(c, v, "max_bytes", 0, 1LL << 40, &c->cfg->cache.max_bytes))
        goto out;
    rc = GW_OK;
out:
    pop(c);
    return rc;
}

/* "thread_pool": the threads that parse large answers off the workers (gw_tpool.h). */
static int
parse_thread_pool(ctx_t *c, json_t *v)
{
    static const char *const keys[] = { "threads", "max_queue", NULL };
    long long threads = c->cfg->thread_pool.threads, max_queue = c->cfg->thread_pool.max_queue;
    push_key(c, "thread_pool");
    int rc = GW_ERR;
    if (!json_is_object(v)) {
        rc = fail(c, "must be an object");
        goto out;
    }
    if (check_keys(c, v, keys, "\"thread_pool\"") || get_int(c, v, "threads", 1, 64, &threads) ||
        get_int(c, v, "max_queue", 1, 1000000, &max_queue))
        goto out;
    c->cfg->thread_pool.threads = (unsigned)threads;
    c->cfg->thread_pool.max_queue = (unsigned)max_queue;
    rc = GW_OK;
out:
    pop(c);
    return rc;
}

static const char *const method_names[] = { "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", NULL };

int
gw_config_method_from_name(const char *name)
{
    static const int nums[] = { HTTP_GET, HTTP_HEAD, HTTP_POST, HTTP_PUT, HTTP_DELETE, HTTP_PATCH, HTTP_OPTIONS };
    for (size_t i = 0; method_names[i]; i++)
        if (strcmp(method_names[i], name) == 0)
            return nums[i];
    return -1;
}

static bool
valid_token(const char *s)
{
    if (*s == '\0')
        return false;
    for (; *s; s++)
        if (!(strchr("!#$%&'*+-.^_`|~", *s) || (*s >= '0' && *s <= '9') || (*s >= 'a' && *s <= 'z') ||
              (*s >= 'A' && *s <= 'Z')))
            return false;
    return true;
}

static bool
valid_header_value(const char *s)
{
    for (; *s; s++)
        if (((unsigned char)*s < 0x20 && *s != '\t') || *s == 0x7f)
            return false;
    return true;
}

/* Whether name is in list (NULL-terminated), ignoring case as header names do. */
static bool
in_list_nocase(const char *const *list, const char *name)
{
    for (const char *const *p = list; *p; p++)
        if (strcasecmp(*p, name) == 0)
            return true;
    return false;
}

/* Headers that gatherd writes itself and a route may not set. */
static bool
reserved_header(const char *name)
{
    static const char *const r[] = { "content-length", "transfer-encoding", "connection", "date", "keep-alive",
                                     "upgrade", "te", "trailer", NULL };
    return in_list_nocase(r, name);
}

static int
parse_respond(ctx_t *c, json_t *v, gw_route_t *route)
{
    static const char *const keys[] = { "status", "headers", "body", NULL };
    push_key(c, "respond");
    int rc = GW_ERR;
    char *head = NULL;
    size_t head_len = 0;
    if (!json_is_object(v)) {
        rc = fail(c, "must be an object like {\"status\": 200, \"body\": {...}}");
        goto out;
    }
    long long status = 200;
    if (check_keys(c, v, keys, "\"respond\"") || get_int(c, v, "status", 200, 599, &status))
        goto out;
    route->kind = GW_ROUTE_RESPOND;
    route->respond.status = (int)status;
    bool has_ctype = false;
    json_t *hdrs = json_object_get(v, "headers");
    if (hdrs != NULL) {
        push_key(c, "headers");
        if (!json_is_object(hdrs)) {
            fail(c, "must be an object of header names to string values");
            pop(c);
            goto out;
        }
        const char *name;
        json_t *hv;
        json_object_foreach(hdrs, name, hv) {
            push_key(c, name);
            if (!valid_token(name)) {
                fail_at(c, true, "invalid header name \"%s\"", name);
            } else if (reserved_header(name)) {
                fail_at(c, true, "header \"%s\" is set by gatherd and cannot be configured", name);
            } else if (!json_is_string(hv)) {
                fail(c, "must be a string, not %s", type_name(hv));
            } else if (!valid_header_value(json_string_value(hv))) {
                fail(c, "header value contains a control character");
            } else {
                if (strcasecmp(name, "content-type") == 0)
                    has_ctype = true;
                size_t need = head_len + strlen(name) + strlen(json_string_value(hv)) + 5;
                head = gw_realloc(head, need);
                head_len += (size_t)snprintf(head + head_len, need - head_len, "%s: %s\r\n", name,
                                             json_string_value(hv));
                pop(c);
                continue;
            }
            pop(c);
            pop(c);
            goto out;
        }
        pop(c);
    }
    json_t *body = json_object_get(v, "body");
    if (body != NULL) {
        /* A string is sent as it is (text); anything else as compact JSON. */
        bool text = json_is_string(body);
        if (text) {
            route->respond.body = gw_strndup(json_string_value(body), json_string_length(body));
            route->respond.body_len = json_string_length(body);
        } else {
            route->respond.body = json_dumps(body, JSON_COMPACT | JSON_ENCODE_ANY);
            route->respond.body_len = strlen(route->respond.body);
        }
        if (!has_ctype) {
            const char *ct = text ? "Content-Type: text/plain; charset=utf-8\r\n" : "Content-Type: application/json\r\n";
            size_t ctlen = strlen(ct);
            head = gw_realloc(head, head_len + ctlen + 1);
            memcpy(head + head_len, ct, ctlen + 1);
            head_len += ctlen;
        }
    }
    route->respond.head = head ? head : gw_strdup("");
    route->respond.head_len = head_len;
    head = NULL;
    rc = GW_OK;
out:
    free(head);
    pop(c);
    return rc;
}

static int
parse_methods(ctx_t *c, json_t *v, uint64_t *out)
{
    push_key(c, "methods");
    int rc = GW_OK;
    if (!json_is_array(v) || json_array_size(v) == 0) {
        rc = fail(c, "must be a non-empty array like [\"GET\", \"POST\"]");
    } else {
        *out = 0;
        size_t i;
        json_t *m;
        json_array_foreach(v, i, m) {
            push_index(c, i);
            int num = json_is_string(m) ? gw_config_method_from_name(json_string_value(m)) : -1;
            if (num < 0)
                rc = fail(c, "unsupported method (use one of GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS)");
            else if (*out & (1ULL << num))
                rc = fail(c, "method \"%s\" is listed twice", json_string_value(m));
            else
                *out |= 1ULL << num;
            pop(c);
            if (rc != GW_OK)
                break;
        }
    }
    pop(c);
    return rc;
}

static const gw_backend_t *
find_backend(const gw_config_t *cfg, const char *name)
{
    for (size_t i = 0; i < cfg->nbackends; i++)
        if (strcmp(cfg->backends[i]->name, name) == 0)
            return cfg->backends[i];
    return NULL;
}

static int
parse_proxy(ctx_t *c, json_t *v, gw_route_t *route)
{
    static const char *const keys[] = { "backend", "strip_prefix", "preserve_host", "max_body_bytes", NULL };
    push_key(c, "proxy");
    int rc = GW_ERR;
    if (!json_is_object(v)) {
        fail(c, "must be an object like {\"backend\": \"users\"}");
        goto out;
    }
    if (check_keys(c, v, keys, "\"proxy\""))
        goto out;
    route->kind = GW_ROUTE_PROXY;
    json_t *b = json_object_get(v, "backend");
    push_key(c, "backend");
    if (!json_is_string(b)) {
        fail(c, "is required and must be the name of a backend");
        pop(c);
        goto out;
    }
    route->proxy.backend = find_backend(c->cfg, json_string_value(b));
    if (route->proxy.backend == NULL) {
        fail(c, "unknown backend \"%s\"", json_string_value(b));
        pop(c);
        goto out;
    }
    pop(c);
    json_t *sp = json_object_get(v, "strip_prefix");
    if (sp != NULL) {
        push_key(c, "strip_prefix");
        gw_path_t prefix = { 0 };
        const char *text = json_is_string(sp) ? json_string_value(sp) : "";
        if (text[0] != '/' || gw_router_normalize(text, strlen(text), &prefix) != GW_OK) {
            fail(c, "must be a path starting with \"/\", like \"/legacy\"");
            gw_path_free(&prefix);
            pop(c);
            goto out;
        }
        /* The prefix must be what the route's pattern starts with, so that
         * every request it matches has those segments to strip. */
        gw_path_t pat = { 0 };
        gw_router_normalize(route->pattern, strlen(route->pattern), &pat);
        bool ok = prefix.nseg <= pat.nseg;
        for (size_t i = 0; ok && i < prefix.nseg; i++)
            ok = prefix.len[i] == pat.len[i] && memcmp(prefix.buf + prefix.off[i], pat.buf + pat.off[i], prefix.len[i]) == 0;
        route->proxy.strip_segments = prefix.nseg;
        gw_path_free(&prefix);
        gw_path_free(&pat);
        if (!ok) {
            fail(c, "\"%s\" is not a literal prefix of the route path \"%s\"", text, route->pattern);
            pop(c);
            goto out;
        }
        pop(c);
    }
    json_t *ph = json_object_get(v, "preserve_host");
    if (ph != NULL) {
        push_key(c, "preserve_host");
        if (!json_is_boolean(ph)) {
            fail(c, "must be true or false");
            pop(c);
            goto out;
        }
        route->proxy.preserve_host = json_is_true(ph);
        pop(c);
    }
    /* Streamed bodies cost no memory, so "no limit" (0) is allowed here,
     * unlike http.max_body_bytes which bounds buffered bodies. */
    route->proxy.max_body_bytes = -1;
    long long mb = -1;
    if (get_int(c, v, "max_body_bytes", 0, 1LL << 50, &mb) != GW_OK)
        goto out;
    if (mb >= 0)
        route->proxy.max_body_bytes = mb == 0 ? INT64_MAX : mb;
    rc = GW_OK;
out:
    pop(c);
    return rc;
}

/* A host name as DNS carries it: dot-separated labels of 1-63 letters,
 * digits, '-' (not first or last) and '_' (container and service names use
 * it), 253 characters at most, an optional final dot; the last label is not
 * all digits, so a mistyped IPv4 address ("10.0.0.300") is never taken for
 * a name. */
static bool
valid_host_name(const char *s)
{
    size_t len = strlen(s);
    if (len > 0 && s[len - 1] == '.')
        len--;
    if (len == 0 || len > 253)
        return false;
    size_t label = 0;
    bool all_digits = true;
    for (size_t i = 0; i <= len; i++) {
        char ch = i < len ? s[i] : '.';
        if (ch == '.') {
            if (label == 0 || label > 63 || s[i - 1] == '-')
                return false;
            if (i == len && all_digits)
                return false;
            label = 0;
            all_digits = true;
            continue;
        }
        if (!((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') || ch == '-' ||
              ch == '_'))
            return false;
        if (label == 0 && ch == '-')
            return false;
        if (!(ch >= '0' && ch <= '9'))
            all_digits = false;
        label++;
    }
    return true;
}

/* "http://127.0.0.1:9101", "https://[::1]:8443", "http://10.0.0.1" (port 80;
 * 443 for https), "http://api.internal:8080" (a host name, resolved by the
 * workers at run time: never here, so "gatherd -t" sends no query). */
static int
parse_server_url(ctx_t *c, gw_peer_t *b, const char *url, bool *tls)
{
    if (strncmp(url, "https://", 8) == 0)
        *tls = true;
    else if (strncmp(url, "http://", 7) == 0)
        *tls = false;
    else
        return fail(c, "must start with http:// or https:// (got \"%s\")", url);
    const char *host = url + (*tls ? 8 : 7);
    const char *end = host + strcspn(host, "/?#");
    if (*end == '?' || *end == '#' || (*end == '/' && end[1] != '\0'))
        return fail(c, "a backend URL has no path or query: the route decides the path");
    char hostport[300];
    size_t len = (size_t)(end - host);
    if (len == 0 || len >= sizeof(hostport) - 4)
        return fail(c, "no host in \"%s\"", url);
    memcpy(hostport, host, len);
    hostport[len] = '\0';
    if (strchr(hostport, '@') != NULL)
        return fail(c, "credentials in a backend URL are not supported (\"%s\")", url);
    /* Default port 80 when none is given. */
    const char *close_br = strchr(hostport, ']');
    const char *last_colon = strrchr(hostport, ':');
    if (last_colon == NULL || (close_br != NULL && last_colon < close_br))
        snprintf(hostport + len, sizeof(hostport) - len, *tls ? ":443" : ":80");
    gw_listen_t l;
    if (parse_addr(hostport, &l) == GW_OK && hostport[0] != '*' && hostport[0] != ':') {
        b->addr = l.addr;
        b->addrlen = l.addrlen;
        b->port = ntohs(l.addr.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&l.addr)->sin6_port
                                                     : ((struct sockaddr_in *)&l.addr)->sin_port);
    } else {
        /* Not an IP address: a host name and a port. */
        char *colon = strrchr(hostport, ':');
        char name[300];
        size_t nlen = (size_t)(colon - hostport);
        memcpy(name, hostport, nlen);
        name[nlen] = '\0';
        char *pend;
        errno = 0;
        long port = strtol(colon + 1, &pend, 10);
        if (hostport[0] == '[' || strchr(name, ':') != NULL || colon[1] < '0' || colon[1] > '9' || *pend != '\0' ||
            errno || port < 1 || port > 65535)
            return fail(c, "bad address in \"%s\" (expected IPv4:PORT, [IPv6]:PORT or NAME:PORT)", url);
        if (strspn(name, "0123456789.") == nlen)
            return fail(c, "bad IPv4 address in \"%s\"", url);
        if (!valid_host_name(name))
            return fail(c, "bad host name \"%s\" (letters, digits, '-' and '_' in dot-separated labels of at most 63)",
                        name);
        b->host_name = gw_strdup(name);
        b->port = (uint16_t)port;
    }
    b->host_header = gw_strdup(hostport);
    /* the host without port and brackets (nor a name's final dot, which
     * SNI does not carry): the default TLS server name */
    char hostonly[300];
    snprintf(hostonly, sizeof(hostonly), "%s", hostport[0] == '[' ? hostport + 1 : hostport);
    char *cut = hostport[0] == '[' ? strchr(hostonly, ']') : strrchr(hostonly, ':');
    if (cut)
        *cut = '\0';
    size_t hl = strlen(hostonly);
    if (hl > 1 && hostonly[hl - 1] == '.')
        hostonly[hl - 1] = '\0';
    b->tls_server_name = gw_strdup(hostonly);
    b->label = gw_strdup(hostport);
    return GW_OK;
}

static bool
is_ip_literal(const char *s)
{
    unsigned char buf[16];
    return inet_pton(AF_INET, s, buf) == 1 || inet_pton(AF_INET6, s, buf) == 1;
}

static const char *
ssl_error_text(char *buf, size_t len)
{
    unsigned long e = ERR_peek_last_error();
    if (e == 0)
        snprintf(buf, len, "unknown OpenSSL error");
    else
        ERR_error_string_n(e, buf, len);
    ERR_clear_error();
    return buf;
}

/* "tls": {"verify", "ca_file", "server_name", "cert_file", "key_file"}; builds b->ssl_ctx. */
static int
parse_tls(ctx_t *c, gw_backend_t *b, json_t *v)
{
    static const char *const keys[] = { "verify", "ca_file", "server_name", "cert_file", "key_file", NULL };
    char ebuf[256];
    b->tls_verify = true;
    if (v != NULL) {
        push_key(c, "tls");
        int rc = GW_ERR;
        if (!b->tls) {
            fail(c, "\"tls\" needs an https:// url");
        } else if (!json_is_object(v)) {
            fail(c, "must be an object like {\"ca_file\": \"/etc/ssl/internal-ca.pem\"}");
        } else if (check_keys(c, v, keys, "\"tls\"") == GW_OK) {
            rc = GW_OK;
            const char *name;
            json_t *f;
            json_object_foreach(v, name, f) {
                push_key(c, name);
                if (strcmp(name, "verify") == 0 ? !json_is_boolean(f) : (!json_is_string(f) || json_string_length(f) == 0))
                    rc = fail(c, strcmp(name, "verify") == 0 ? "must be true or false" : "must be a non-empty string");
                pop(c);
                if (rc != GW_OK)
                    break;
            }
        }
        if (rc != GW_OK) {
            pop(c);
            return GW_ERR;
        }
        pop(c);
    }
    if (!b->tls)
        return GW_OK;
    json_t *verify = v ? json_object_get(v, "verify") : NULL;
    json_t *ca = v ? json_object_get(v, "ca_file") : NULL;
    json_t *sn = v ? json_object_get(v, "server_name") : NULL;
    json_t *cert = v ? json_object_get(v, "cert_file") : NULL;
    json_t *key = v ? json_object_get(v, "key_file") : NULL;
    if (verify && json_is_false(verify))
        b->tls_verify = false;
    for (size_t i = 0; i < b->nservers; i++) {
        gw_peer_t *s = &b->servers[i];
        if (sn) {
            free(s->tls_server_name);
            s->tls_server_name = gw_strdup(json_string_value(sn));
        }
        s->tls_name_is_ip = is_ip_literal(s->tls_server_name);
    }
    SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
    if (ctx == NULL)
        return fail(c, "cannot create a TLS context: %s", ssl_error_text(ebuf, sizeof(ebuf)));
    b->ssl_ctx = ctx; /* freed with the backend */
    SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
    SSL_CTX_set_mode(ctx, SSL_MODE_RELEASE_BUFFERS);
    /* Sessions are kept per worker pool for resumption (gw_upstream.c). */
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_CLIENT | SSL_SESS_CACHE_NO_INTERNAL_STORE);
    SSL_CTX_sess_set_new_cb(ctx, gw_upstream_tls_new_session);
    SSL_CTX_set_verify(ctx, b->tls_verify ? SSL_VERIFY_PEER : SSL_VERIFY_NONE, NULL);
    if (ca) {
        push_key(c, "tls");
        push_key(c, "ca_file");
        int rc = SSL_CTX_load_verify_locations(ctx, json_string_value(ca), NULL) == 1
                     ? GW_OK
                     : fail(c, "cannot load \"%s\": %s", json_string_value(ca), ssl_error_text(ebuf, sizeof(ebuf)));
        pop(c);
        pop(c);
        if (rc != GW_OK)
            return GW_ERR;
    } else if (SSL_CTX_set_default_verify_paths(ctx) != 1) {
        return fail(c, "cannot load the system CA store: %s", ssl_error_text(ebuf, sizeof(ebuf)));
    }
    if ((cert == NULL) != (key == NULL))
        return fail(c, "tls.cert_file and tls.key_file go together");
    if (cert) {
        push_key(c, "tls");
        push_key(c, "cert_file");
        int rc = GW_OK;
        if (SSL_CTX_use_certificate_chain_file(ctx, json_string_value(cert)) != 1)
            rc = fail(c, "cannot load \"%s\": %s", json_string_value(cert), ssl_error_text(ebuf, sizeof(ebuf)));
        pop(c);
        if (rc == GW_OK) {
            push_key(c, "key_file");
            if (SSL_CTX_use_PrivateKey_file(ctx, json_string_value(key), SSL_FILETYPE_PEM) != 1 ||
                SSL_CTX_check_private_key(ctx) != 1)
                rc = fail(c, "cannot use \"%s\" with the certificate: %s", json_string_value(key),
                          ssl_error_text(ebuf, sizeof(ebuf)));
            pop(c);
        }
        pop(c);
        if (rc != GW_OK)
            return GW_ERR;
    }
    return GW_OK;
}

/* "retry": {"attempts", "backoff_base_ms", "backoff_cap_ms",
 * "per_try_timeout_ms", "statuses", "retry_non_idempotent",
 * "budget_percent", "min_retries"} into b->retry (see gw_retry.h). */
static int
parse_retry(ctx_t *c, gw_backend_t *b, json_t *v)
{
    static const char *const keys[] = { "attempts", "backoff_base_ms", "backoff_cap_ms", "per_try_timeout_ms",
                                        "statuses", "retry_non_idempotent", "budget_percent", "min_retries", NULL };
    gw_retry_conf_t *rc = b->retry;
    if (v == NULL)
        return GW_OK;
    push_key(c, "retry");
    int rc_ = GW_ERR;
    long long attempts = 3, base = rc->backoff_base_ms, cap = rc->backoff_cap_ms, per_try = 0, pct = rc->budget_percent,
              minr = rc->min_retries;
    json_t *x;
    if (!json_is_object(v)) {
        fail(c, "must be an object like {\"attempts\": 3}");
    } else if (check_keys(c, v, keys, "\"retry\"") == GW_OK && get_int(c, v, "attempts", 1, GW_RETRY_MAX_ATTEMPTS, &attempts) == GW_OK &&
               get_int(c, v, "backoff_base_ms", 0, 60000, &base) == GW_OK &&
               get_int(c, v, "backoff_cap_ms", 0, 60000, &cap) == GW_OK &&
               get_int(c, v, "per_try_timeout_ms", 0, 86400000, &per_try) == GW_OK &&
               get_int(c, v, "budget_percent", 0, 100, &pct) == GW_OK &&
               get_int(c, v, "min_retries", 0, 100000, &minr) == GW_OK) {
        rc_ = GW_OK;
        if (cap < base)
            rc_ = fail_in(c, "backoff_cap_ms", "must not be below backoff_base_ms (%lld)", base);
        if (rc_ == GW_OK && (x = json_object_get(v, "retry_non_idempotent")) != NULL) {
            if (!json_is_boolean(x))
                rc_ = fail_in(c, "retry_non_idempotent", "must be true or false");
            else
                rc->retry_non_idempotent = json_is_true(x);
        }
        if (rc_ == GW_OK && (x = json_object_get(v, "statuses")) != NULL) {
            if (!json_is_array(x) || json_array_size(x) > GW_RETRY_MAX_STATUSES) {
                rc_ = fail_in(c, "statuses", "must be an array of at most %d statuses like [502, 503, 504]",
                              GW_RETRY_MAX_STATUSES);
            } else {
                push_key(c, "statuses");
                rc->nstatuses = 0;
                size_t i;
                json_t *st;
                json_array_foreach(x, i, st) {
                    push_index(c, i);
                    if (!json_is_integer(st) || json_integer_value(st) < 400 || json_integer_value(st) > 599)
                        rc_ = fail(c, "must be a status between 400 and 599");
                    else if (gw_retry_status(rc, (int)json_integer_value(st)))
                        rc_ = fail(c, "status %d is listed twice", (int)json_integer_value(st));
                    else
                        rc->statuses[rc->nstatuses++] = (int)json_integer_value(st);
                    pop(c);
                    if (rc_ != GW_OK)
                        break;
                }
                pop(c);
            }
        }
    }
    pop(c);
    rc->enabled = true;
    rc->counted = true;
    rc->attempts = (unsigned)attempts;
    rc->backoff_base_ms = (int)base;
    rc->backoff_cap_ms = (int)cap;
    rc->per_try_timeout_ms = (int)per_try;
    rc->budget_percent = (unsigned)pct;
    rc->min_retries = (unsigned)minr;
    return rc_;
}

/* A backend's "circuit_breaker" (absent: none): every key optional. The
 * breaker's shared state is made here, owned by b (gw_breaker.h). */
static int
parse_breaker(ctx_t *c, gw_backend_t *b, json_t *v)
{
    static const char *const keys[] = { "consecutive_failures", "failure_ratio", "window_ms", "min_requests",
                                        "open_ms", "max_open_ms", "probe_requests", NULL };
    if (v == NULL)
        return GW_OK;
    gw_breaker_conf_t *bc = &b->breaker_conf;
    long long cf = 5, minr = 20, probes = 1;
    bc->failure_ratio = 0.5;
    bc->window_ms = 10000;
    bc->open_ms = 5000;
    bc->max_open_ms = 60000;
    push_key(c, "circuit_breaker");
    int rc = GW_ERR;
    long long window = bc->window_ms;
    json_t *ratio = json_object_get(v, "failure_ratio");
    if (!json_is_object(v)) {
        fail(c, "must be an object like {\"consecutive_failures\": 5}");
    } else if (check_keys(c, v, keys, "\"circuit_breaker\"") == GW_OK &&
               get_int(c, v, "consecutive_failures", 0, 1000000, &cf) == GW_OK &&
               get_int(c, v, "window_ms", 100, 3600000, &window) == GW_OK &&
               get_int(c, v, "min_requests", 1, 1000000, &minr) == GW_OK && get_ms(c, v, "open_ms", &bc->open_ms) == GW_OK &&
               get_ms(c, v, "max_open_ms", &bc->max_open_ms) == GW_OK &&
               get_int(c, v, "probe_requests", 1, 1000, &probes) == GW_OK) {
        if (ratio && (!json_is_number(ratio) || json_number_value(ratio) < 0 || json_number_value(ratio) > 1)) {
            fail_in(c, "failure_ratio", "must be a number from 0 to 1 (0: no ratio trigger)");
        } else if (bc->max_open_ms < bc->open_ms) {
            fail_in(c, "max_open_ms", "must not be below open_ms (%d)", bc->open_ms);
        } else {
            if (ratio)
                bc->failure_ratio = json_number_value(ratio);
            bc->consecutive_failures = (unsigned)cf;
            bc->window_ms = (int)window;
            bc->min_requests = (unsigned)minr;
            bc->probe_requests = (unsigned)probes;
            if (bc->consecutive_failures == 0 && bc->failure_ratio == 0)
                fail(c, "consecutive_failures and failure_ratio are both 0: it could never open (remove it instead)");
            else
                rc = GW_OK;
        }
    }
    pop(c);
    if (rc == GW_OK)
        b->breaker = gw_breaker_new(b->name, bc);
    return rc;
}

/* One server: s->url set; the rest from it. *tls: its scheme. At the
 * current path (the server's URL). */
static int
server_from_url(ctx_t *c, gw_peer_t *s, bool *tls)
{
    s->hs = gw_hserver_new();
    return parse_server_url(c, s, s->url, tls);
}

/* "servers": ["http://10.0.0.1:8080", {"url": ..., "weight": 1-1000,
 * "backup": false}], or the "url" shorthand (one server). Exactly one of
 * the two; one scheme; no server twice; at most GW_CLUSTER_MAX_SERVERS. */
static int
parse_servers(ctx_t *c, gw_backend_t *b, json_t *bv)
{
    static const char *const keys[] = { "url", "weight", "backup", NULL };
    json_t *url = json_object_get(bv, "url");
    json_t *list = json_object_get(bv, "servers");
    if (url != NULL && list != NULL)
        return fail_in(c, "servers", "\"url\" and \"servers\" both given: \"url\" is the one-server shorthand of "
                                     "\"servers\", use one of them");
    if (url != NULL || list == NULL) {
        push_key(c, "url");
        int rc = GW_ERR;
        if (!json_is_string(url)) {
            fail(c, "is required (or \"servers\") and must be a URL like \"http://127.0.0.1:9101\"");
        } else {
            b->servers = gw_calloc(1, sizeof(gw_peer_t));
            b->nservers = 1;
            b->servers[0].url = gw_strdup(json_string_value(url));
            b->servers[0].weight = 1;
            b->nprimary = 1;
            rc = server_from_url(c, &b->servers[0], &b->tls);
        }
        pop(c);
        return rc;
    }
    push_key(c, "servers");
    if (!json_is_array(list) || json_array_size(list) == 0) {
        int rc = fail(c, "must be a non-empty array of URLs or {\"url\", \"weight\", \"backup\"} objects");
        pop(c);
        return rc;
    }
    if (json_array_size(list) > GW_CLUSTER_MAX_SERVERS) {
        int rc = fail(c, "at most %d servers per backend (the request path keeps the servers a call tried in a "
                         "%d-bit mask), not %zu",
                      GW_CLUSTER_MAX_SERVERS, GW_CLUSTER_MAX_SERVERS, json_array_size(list));
        pop(c);
        return rc;
    }
    b->servers = gw_calloc(json_array_size(list), sizeof(gw_peer_t));
    int rc = GW_OK;
    size_t i;
    json_t *sv;
    json_array_foreach(list, i, sv) {
        gw_peer_t *sp = &b->servers[i];
        b->nservers = i + 1; /* freed with the backend from here on */
        sp->index = i;
        sp->weight = 1;
        push_index(c, i);
        bool tls = false;
        if (json_is_string(sv)) {
            sp->url = gw_strdup(json_string_value(sv));
            rc = server_from_url(c, sp, &tls);
        } else if (!json_is_object(sv)) {
            rc = fail(c, "must be a URL like \"http://10.0.0.1:8080\" or an object like "
                         "{\"url\": \"http://10.0.0.1:8080\", \"weight\": 2}");
        } else if ((rc = check_keys(c, sv, keys, "a server")) == GW_OK) {
            json_t *u = json_object_get(sv, "url");
            json_t *bk = json_object_get(sv, "backup");
            long long weight = 1;
            push_key(c, "url");
            if (!json_is_string(u)) {
                rc = fail(c, "is required and must be a URL like \"http://10.0.0.1:8080\"");
            } else {
                sp->url = gw_strdup(json_string_value(u));
                rc = server_from_url(c, sp, &tls);
            }
            pop(c);
            if (rc == GW_OK && (rc = get_int(c, sv, "weight", 1, 1000, &weight)) == GW_OK)
                sp->weight = (unsigned)weight;
            if (rc == GW_OK && bk != NULL) {
                if (!json_is_boolean(bk))
                    rc = fail_in(c, "backup", "must be true or false");
                else
                    sp->backup = json_is_true(bk);
            }
        }
        if (rc == GW_OK && i == 0)
            b->tls = tls;
        if (rc == GW_OK && tls != b->tls)
            rc = fail(c, "\"%s\" is %s but servers[0] is %s: all servers of a backend use the same scheme", sp->url,
                      tls ? "https" : "http", b->tls ? "https" : "http");
        for (size_t k = 0; rc == GW_OK && k < i; k++)
            if (strcasecmp(b->servers[k].label, sp->label) == 0)
                rc = fail(c, "\"%s\" is the same server as servers[%zu] (\"%s\")", sp->url, k, b->servers[k].url);
        pop(c);
        if (rc != GW_OK)
            break;
        if (!sp->backup)
            b->nprimary++;
    }
    if (rc == GW_OK && b->nprimary == 0)
        rc = fail(c, "every server is a backup: at least one must not be");
    pop(c);
    return rc;
}

/* "balance" and "hash_key". The key is a header-kind template with no
 * route scope: {header.NAME}, {query.NAME} and path parameters by name
 * ({id}: the parameter of the route being served; missing in a route
 * without it). */
static int
parse_balance(ctx_t *c, gw_backend_t *b, json_t *bv)
{
    json_t *bal = json_object_get(bv, "balance");
    json_t *key = json_object_get(bv, "hash_key");
    if (bal != NULL) {
        const char *name = json_is_string(bal) ? json_string_value(bal) : "";
        if (strcmp(name, "round_robin") == 0)
            b->balance = GW_BAL_RR;
        else if (strcmp(name, "least_request") == 0)
            b->balance = GW_BAL_LEAST;
        else if (strcmp(name, "hash") == 0)
            b->balance = GW_BAL_HASH;
        else
            return fail_in(c, "balance", "must be \"round_robin\", \"least_request\" or \"hash\"");
    }
    if (b->balance != GW_BAL_HASH) {
        if (key != NULL)
            return fail_in(c, "hash_key", "is only used with \"balance\": \"hash\"");
        return GW_OK;
    }
    if (key == NULL)
        return fail_in(c, "balance", "\"hash\" needs \"hash_key\", a template like \"{header.X-User}\"");
    if (!json_is_string(key) || json_string_length(key) == 0)
        return fail_in(c, "hash_key", "must be a non-empty template like \"{header.X-User}\"");
    gw_tpl_scope_t scope = { .any_param = true };
    char terr[512];
    b->hash_key = gw_tpl_compile(json_string_value(key), GW_TPL_HEADER, &scope, terr, sizeof(terr));
    if (b->hash_key == NULL)
        return fail_in(c, "hash_key", "%s", terr);
    return GW_OK;
}

/* "health_check": {"path", "interval_ms", "timeout_ms", "healthy",
 * "unhealthy", "statuses"}; absent: no active checks. */
static int
parse_health_check(ctx_t *c, gw_backend_t *b, json_t *v)
{
    static const char *const keys[] = { "path", "interval_ms", "timeout_ms", "healthy", "unhealthy", "statuses", NULL };
    if (v == NULL)
        return GW_OK;
    gw_hc_conf_t *hc = gw_calloc(1, sizeof(*hc));
    b->health_check = hc; /* freed with b */
    hc->path = gw_strdup("/healthz");
    hc->statuses[0] = 200;
    hc->nstatuses = 1;
    long long interval = 2000, timeout = 1000, healthy = 2, unhealthy = 3;
    push_key(c, "health_check");
    int rc = GW_ERR;
    json_t *path = json_object_get(v, "path");
    json_t *st = json_object_get(v, "statuses");
    if (!json_is_object(v)) {
        fail(c, "must be an object like {\"path\": \"/healthz\"}");
    } else if (check_keys(c, v, keys, "\"health_check\"") == GW_OK &&
               get_int(c, v, "interval_ms", 100, 3600000, &interval) == GW_OK &&
               get_int(c, v, "timeout_ms", 10, 60000, &timeout) == GW_OK &&
               get_int(c, v, "healthy", 1, 100, &healthy) == GW_OK &&
               get_int(c, v, "unhealthy", 1, 100, &unhealthy) == GW_OK) {
        rc = GW_OK;
        if (path != NULL) {
            const char *p = json_is_string(path) ? json_string_value(path) : "";
            bool ok = p[0] == '/' && strlen(p) <= 1024;
            for (const char *q = p; ok && *q; q++)
                if ((unsigned char)*q <= 0x20 || (unsigned char)*q >= 0x7f || *q == '#')
                    ok = false;
            if (!ok) {
                rc = fail_in(c, "path", "must be a path starting with \"/\" (printable ASCII, no spaces, at most "
                                        "1024 bytes), like \"/healthz\"");
            } else {
                free(hc->path);
                hc->path = gw_strdup(p);
            }
        }
        if (rc == GW_OK && timeout > interval)
            rc = fail_in(c, "timeout_ms", "must not be above interval_ms (%lld)", interval);
        if (rc == GW_OK && st != NULL) {
            if (!json_is_array(st) || json_array_size(st) == 0 || json_array_size(st) > GW_HC_MAX_STATUSES) {
                rc = fail_in(c, "statuses", "must be a non-empty array of at most %d statuses like [200, 204]",
                             GW_HC_MAX_STATUSES);
            } else {
                push_key(c, "statuses");
                hc->nstatuses = 0;
                size_t i;
                json_t *x;
                json_array_foreach(st, i, x) {
                    push_index(c, i);
                    if (!json_is_integer(x) || json_integer_value(x) < 100 || json_integer_value(x) > 599) {
                        rc = fail(c, "must be a status between 100 and 599");
                    } else {
                        for (size_t k = 0; k < hc->nstatuses && rc == GW_OK; k++)
                            if (hc->statuses[k] == (int)json_integer_value(x))
                                rc = fail(c, "status %d is listed twice", hc->statuses[k]);
                        if (rc == GW_OK)
                            hc->statuses[hc->nstatuses++] = (int)json_integer_value(x);
                    }
                    pop(c);
                    if (rc != GW_OK)
                        break;
                }
                pop(c);
            }
        }
    }
    pop(c);
    hc->interval_ms = (int)interval;
    hc->timeout_ms = (int)timeout;
    hc->healthy = (unsigned)healthy;
    hc->unhealthy = (unsigned)unhealthy;
    return rc;
}

/* "outlier_detection": {"consecutive_failures", "eject_ms", "max_eject_ms",
 * "max_ejected_percent"}; absent: none. */
static int
parse_outlier(ctx_t *c, gw_backend_t *b, json_t *v)
{
    static const char *const keys[] = { "consecutive_failures", "eject_ms", "max_eject_ms", "max_ejected_percent",
                                        NULL };
    if (v == NULL)
        return GW_OK;
    gw_outlier_conf_t *oc = &b->outlier;
    long long cf = 5, pct = 50;
    oc->eject_ms = 10000;
    oc->max_eject_ms = 300000;
    push_key(c, "outlier_detection");
    int rc = GW_ERR;
    if (!json_is_object(v)) {
        fail(c, "must be an object like {\"consecutive_failures\": 5}");
    } else if (check_keys(c, v, keys, "\"outlier_detection\"") == GW_OK &&
               get_int(c, v, "consecutive_failures", 1, 100000, &cf) == GW_OK &&
               get_ms(c, v, "eject_ms", &oc->eject_ms) == GW_OK && get_ms(c, v, "max_eject_ms", &oc->max_eject_ms) == GW_OK &&
               get_int(c, v, "max_ejected_percent", 0, 100, &pct) == GW_OK) {
        if (oc->max_eject_ms < oc->eject_ms)
            fail_in(c, "max_eject_ms", "must not be below eject_ms (%d)", oc->eject_ms);
        else
            rc = GW_OK;
    }
    pop(c);
    oc->enabled = rc == GW_OK;
    oc->consecutive_failures = (unsigned)cf;
    oc->max_ejected_percent = (unsigned)pct;
    return rc;
}

/* Each server's conn_key, and the backend's copies of the first server's
 * fields (the request path does not pick servers yet). */
static void
finish_servers(gw_backend_t *b, json_t *bv)
{
    json_t *tls = json_object_get(bv, "tls");
    char *tls_text = tls ? json_dumps(tls, JSON_COMPACT | JSON_SORT_KEYS) : NULL;
    for (size_t i = 0; i < b->nservers; i++) {
        gw_peer_t *s = &b->servers[i];
        size_t len = strlen(s->url) + (tls_text ? strlen(tls_text) : 0) + 32;
        s->conn_key = gw_malloc(len);
        snprintf(s->conn_key, len, "%s|%d|%s", s->url, b->connect_timeout_ms, tls_text ? tls_text : "");
    }
    free(tls_text);
    const gw_peer_t *s0 = &b->servers[0];
    b->url = gw_strdup(s0->url);
    b->addr = s0->addr;
    b->addrlen = s0->addrlen;
    b->host_name = s0->host_name ? gw_strdup(s0->host_name) : NULL;
    b->port = s0->port;
    b->host_header = gw_strdup(s0->host_header);
    b->tls_server_name = gw_strdup(s0->tls_server_name);
    b->tls_name_is_ip = s0->tls_name_is_ip;
    b->conn_key = gw_strdup(s0->conn_key);
}

static int
conn_key_cmp(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* What the answers of backend b's calls depend on, for a cache scope
 * (gw_cache_scope_same): every server's conn_key (URL, connect timeout,
 * TLS settings), sorted so that an order change alone is no change, one a
 * line. Weights, backups and the balance are left out: any server's answer
 * is taken for the backend's. New string; the caller frees it. */
static char *
cluster_conn_key(const gw_backend_t *b)
{
    const char **keys = gw_calloc(b->nservers ? b->nservers : 1, sizeof(char *));
    size_t len = 1;
    for (size_t i = 0; i < b->nservers; i++) {
        keys[i] = b->servers[i].conn_key;
        len += strlen(keys[i]) + 1;
    }
    qsort(keys, b->nservers, sizeof(char *), conn_key_cmp);
    char *out = gw_malloc(len), *p = out;
    for (size_t i = 0; i < b->nservers; i++) {
        size_t n = strlen(keys[i]);
        memcpy(p, keys[i], n);
        p[n] = '\n';
        p += n + 1;
    }
    *p = '\0';
    free(keys);
    return out;
}

static int
parse_backends(ctx_t *c, json_t *v)
{
    static const char *const keys[] = { "url", "servers", "balance", "hash_key", "health_check", "outlier_detection",
                                        "connect_timeout_ms", "timeout_ms", "idle_timeout_ms",
                                        "max_connections", "max_idle", "max_response_bytes", "tls",
                                        "max_pending", "queue_timeout_ms", "circuit_breaker", "retry", NULL };
    gw_config_t *cfg = c->cfg;
    push_key(c, "backends");
    if (!json_is_object(v)) {
        int rc = fail(c, "must be an object of backend names to backends");
        pop(c);
        return rc;
    }
    const char *name;
    json_t *bv;
    json_object_foreach(v, name, bv) {
        push_key(c, name);
        gw_backend_t *b = gw_calloc(1, sizeof(gw_backend_t));
        cfg->backends = gw_realloc(cfg->backends, (cfg->nbackends + 1) * sizeof(gw_backend_t *));
        b->index = cfg->nbackends;
        cfg->backends[cfg->nbackends++] = b; /* owned by cfg from here on */
        b->name = gw_strdup(name);
        b->connect_timeout_ms = 1000;
        b->timeout_ms = 30000;
        b->idle_timeout_ms = 30000;
        b->max_connections = 256;
        b->max_idle = 0; /* set below: max_connections unless given */
        b->max_response_bytes = 8u << 20;
        b->retry = gw_retry_conf_new();
        b->max_pending = 128;
        b->queue_timeout_ms = 1000;
        long long maxc = b->max_connections, maxi = b->max_idle, maxp = b->max_pending;
        int rc = GW_ERR;
        if (!json_is_object(bv)) {
            fail(c, "must be an object like {\"url\": \"http://127.0.0.1:9101\"}");
        } else if (check_keys(c, bv, keys, "a backend") == GW_OK) {
            rc = parse_servers(c, b, bv);
            if (rc == GW_OK) {
                for (size_t i = 0; i < b->nservers; i++) {
                    if (b->servers[i].host_name != NULL) {
                        cfg->nnamed++;
                        break;
                    }
                }
            }
            if (rc == GW_OK &&
                (get_ms(c, bv, "connect_timeout_ms", &b->connect_timeout_ms) || get_ms(c, bv, "timeout_ms", &b->timeout_ms) ||
                 get_ms(c, bv, "idle_timeout_ms", &b->idle_timeout_ms) ||
                 get_int(c, bv, "max_connections", 1, 100000, &maxc) || get_int(c, bv, "max_idle", 0, 100000, &maxi) ||
                 get_size(c, bv, "max_response_bytes", 1, 1LL << 40, &b->max_response_bytes) ||
                 get_int(c, bv, "max_pending", 0, 100000, &maxp) || get_ms(c, bv, "queue_timeout_ms", &b->queue_timeout_ms) ||
                 parse_breaker(c, b, json_object_get(bv, "circuit_breaker")) || parse_balance(c, b, bv) ||
                 parse_health_check(c, b, json_object_get(bv, "health_check")) ||
                 parse_outlier(c, b, json_object_get(bv, "outlier_detection"))))
                rc = GW_ERR;
            b->max_connections = (unsigned)maxc;
            /* Idle connections up to max_connections by default: a release
             * below the limits never closes a connection the next call would
             * open again; idle_timeout_ms reaps what a burst left. A larger
             * max_idle could never be reached (idle ones are open ones): it
             * means "all of them", like the default. */
            b->max_idle = json_object_get(bv, "max_idle") && maxi < maxc ? (unsigned)maxi : (unsigned)maxc;
            b->max_pending = (unsigned)maxp;
            if (rc == GW_OK && parse_tls(c, b, json_object_get(bv, "tls")) != GW_OK)
                rc = GW_ERR;
            if (rc == GW_OK)
                finish_servers(b, bv);
            if (rc == GW_OK && parse_retry(c, b, json_object_get(bv, "retry")) != GW_OK)
                rc = GW_ERR;
        }
        pop(c);
        if (rc != GW_OK) {
            pop(c);
            return GW_ERR;
        }
    }
    pop(c);
    return GW_OK;
}

/* "resolver": {"nameservers", "timeout_ms", "attempts", "min_ttl_ms",
 * "max_ttl_ms", "hosts_file"}. Only checked here: nothing is resolved and
 * no file is read but a named hosts file's readability. */
static int
parse_resolver(ctx_t *c, json_t *v)
{
    static const char *const keys[] = { "nameservers", "timeout_ms", "attempts", "min_ttl_ms", "max_ttl_ms",
                                        "hosts_file", NULL };
    gw_resolver_conf_t *r = &c->cfg->resolver;
    push_key(c, "resolver");
    int rc = GW_ERR;
    long long timeout = r->timeout_ms, attempts = r->attempts;
    if (!json_is_object(v)) {
        fail(c, "must be an object like {\"nameservers\": [\"10.0.0.2\"]}");
        goto out;
    }
    if (check_keys(c, v, keys, "\"resolver\"") || get_int(c, v, "timeout_ms", 10, 60000, &timeout) ||
        get_int(c, v, "attempts", 1, 10, &attempts) || get_ms(c, v, "min_ttl_ms", &r->min_ttl_ms) ||
        get_ms(c, v, "max_ttl_ms", &r->max_ttl_ms))
        goto out;
    r->timeout_ms = (int)timeout;
    r->attempts = (int)attempts;
    if (r->min_ttl_ms > r->max_ttl_ms) {
        push_key(c, json_object_get(v, "min_ttl_ms") ? "min_ttl_ms" : "max_ttl_ms");
        fail(c, "min_ttl_ms (%d) must not be above max_ttl_ms (%d)", r->min_ttl_ms, r->max_ttl_ms);
        pop(c);
        goto out;
    }
    json_t *ns = json_object_get(v, "nameservers");
    if (ns != NULL) {
        push_key(c, "nameservers");
        if (!json_is_array(ns) || json_array_size(ns) == 0 || json_array_size(ns) > 16) {
            fail(c, "must be an array of 1 to 16 addresses like [\"10.0.0.2\", \"10.0.0.3:5353\", \"[::1]:53\"]");
            pop(c);
            goto out;
        }
        r->nameservers = gw_calloc(json_array_size(ns), sizeof(gw_listen_t));
        size_t i;
        json_t *a;
        json_array_foreach(ns, i, a) {
            push_index(c, i);
            gw_listen_t *l = &r->nameservers[i];
            int len = (int)sizeof(l->addr);
            if (!json_is_string(a) ||
                evutil_parse_sockaddr_port(json_string_value(a), (struct sockaddr *)&l->addr, &len) != 0) {
                fail(c, "bad nameserver address (expected an IP address, IP:PORT or [IPv6]:PORT; no host names)");
                pop(c);
                pop(c);
                goto out;
            }
            l->addrlen = (socklen_t)len;
            struct sockaddr_in *in4 = (struct sockaddr_in *)&l->addr;
            struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)&l->addr;
            if (l->addr.ss_family == AF_INET && in4->sin_port == 0)
                in4->sin_port = htons(53);
            else if (l->addr.ss_family == AF_INET6 && in6->sin6_port == 0)
                in6->sin6_port = htons(53);
            l->text = gw_strdup(json_string_value(a));
            r->nnameservers = i + 1;
            pop(c);
        }
        pop(c);
    }
    json_t *hf = json_object_get(v, "hosts_file");
    if (hf != NULL) {
        push_key(c, "hosts_file");
        if (json_is_boolean(hf)) {
            free(r->hosts_file);
            r->hosts_file = json_is_true(hf) ? gw_strdup("/etc/hosts") : NULL;
        } else if (json_is_string(hf) && json_string_length(hf) > 0) {
            if (access(json_string_value(hf), R_OK) != 0) {
                fail(c, "cannot read \"%s\": %s", json_string_value(hf), strerror(errno));
                pop(c);
                goto out;
            }
            free(r->hosts_file);
            r->hosts_file = gw_strdup(json_string_value(hf));
        } else {
            fail(c, "must be true, false or the path of a hosts file");
            pop(c);
            goto out;
        }
        pop(c);
    }
    rc = GW_OK;
out:
    pop(c);
    return rc;
}

/* --- aggregate routes ("calls") ------------------------------------------- */

/*
 * An aggregate route is compiled completely here, so that a request never
 * meets a configuration mistake: every template and JSON path is compiled,
 * every name a template, "after" or "foreach" uses is resolved to a call
 * index, and the dependency masks are checked for cycles. Calls are attached
 * to their route (owned by cfg) before they are filled in, so route_free()
 * frees a half-parsed call on any error path.
 */

static const char *const call_keys[] = { "name", "backend", "method", "path", "headers", "forward_headers", "body",
                                         "timeout_ms", "required", "fallback", "group", "after", "foreach",
                                         "foreach_concurrency", "foreach_max", "target", "allow", "deny", "rename",
                                         "hedge_after_ms", "when", "skip_value", "into", "batch", "cache", "coalesce",
                                         NULL };

/* Headers a call may neither set nor forward: gatherd writes them itself
 * (Host, framing, the request id, X-Forwarded-*, Via), or they are
 * hop-by-hop and belong to the client's connection, not to gatherd's. */
static bool
reserved_call_header(const char *name)
{
    static const char *const r[] = { "host", "content-length", "transfer-encoding", "connection", "keep-alive", "te",
                                     "trailer", "upgrade", "expect", "proxy-connection", "x-request-id",
                                     "x-forwarded-for", "x-forwarded-proto", "via", NULL };
    return in_list_nocase(r, name);
}

static void
call_free(gw_call_t *call)
{
    if (call == NULL)
        return;
    free(call->name);
    gw_cache_scope_unref(call->cache);
    gw_tpl_free(call->target);
    for (size_t i = 0; i < call->nheaders; i++) {
        free(call->headers[i].name);
        gw_tpl_free(call->headers[i].value);
    }
    free(call->headers);
    for (size_t i = 0; i < call->nforward; i++)
        free(call->forward_headers[i]);
    free(call->forward_headers);
    gw_tpl_json_free(call->body);
    json_decref(call->fallback);
    free(call->group);
    gw_jpath_free(call->foreach_path);
    free(call->into);
    gw_batch_free(call->batch);
    gw_cond_free(call->when);
    json_decref(call->skip_value);
    gw_jpath_free(call->target_path);
    gw_jpath_sel_free(call->allow);
    gw_jpath_sel_free(call->deny);
    for (size_t i = 0; i < call->nrename; i++) {
        free(call->rename[i].name);
        free(call->rename[i].value);
    }
    free(call->rename);
    free(call);
}

/* The index of the call named name[0..len) in route, or -1. Only calls
 * whose name is already set are searched. */
static long
call_index(const gw_route_t *route, const char *name, size_t len)
{
    for (size_t i = 0; i < route->agg.ncalls; i++) {
        const char *n = route->agg.calls[i]->name;
        if (n != NULL && strlen(n) == len && memcmp(n, name, len) == 0)
            return (long)i;
    }
    return -1;
}

static bool
valid_call_name(const char *s, size_t len)
{
    if (len == 0 || len > 64)
        return false;
    for (size_t i = 0; i < len; i++)
        if (!((s[i] >= 'a' && s[i] <= 'z') || (s[i] >= 'A' && s[i] <= 'Z') || (s[i] >= '0' && s[i] <= '9') ||
              s[i] == '_' || s[i] == '-'))
            return false;
    return true;
}

/* "query", "header" and "item" start placeholders of their own, so a call
 * or a path parameter with one of these names could never be referred to. */
static bool
reserved_tpl_name(const char *name)
{
    return strcmp(name, "query") == 0 || strcmp(name, "header") == 0 || strcmp(name, "item") == 0;
}

/* Fills route->agg.params from the pattern, which gw_router_add() has
 * accepted: every "{" starts a whole "{name}" segment with a valid name
 * that appears once. */
static void
collect_params(gw_route_t *route)
{
    size_t n = 0;
    for (const char *p = route->pattern; (p = strchr(p, '{')) != NULL; p++)
        n++;
    route->agg.params = gw_calloc(n, sizeof(char *));
    for (const char *p = route->pattern; (p = strchr(p, '{')) != NULL; p++) {
        const char *end = strchr(p, '}');
        route->agg.params[route->agg.nparams++] = gw_strndup(p + 1, (size_t)(end - p - 1));
    }
}

/* First pass over one call: its keys and its name, so that the templates
 * of every call can refer to calls listed after it. */
static int
parse_call_name(ctx_t *c, json_t *v, gw_route_t *route, gw_call_t *call)
{
    if (!json_is_object(v))
        return fail(c, "a call must be an object with \"name\", \"backend\" and \"path\"");
    if (check_keys(c, v, call_keys, "a call"))
        return GW_ERR;
    json_t *name = json_object_get(v, "name");
    if (name == NULL)
        return fail(c, "\"name\" is required: 1-64 characters of A-Z a-z 0-9 _ -");
    if (!json_is_string(name) || !valid_call_name(json_string_value(name), json_string_length(name)))
        return fail_in(c, "name", "must be 1-64 characters of A-Z a-z 0-9 _ -");
    const char *s = json_string_value(name);
    if (reserved_tpl_name(s))
        return fail_in(c, "name", "\"%s\" is reserved in templates ({query.NAME}, {header.NAME}, {item})", s);
    long other = call_index(route, s, strlen(s));
    if (other >= 0)
        return fail_in(c, "name", "\"%s\" is already the name of calls[%ld]", s, other);
    for (size_t i = 0; i < route->agg.nparams; i++)
        if (strcmp(route->agg.params[i], s) == 0)
            return fail_in(c, "name", "\"%s\" is also a path parameter of the route: rename one", s);
    call->name = gw_strdup(s);
    return GW_OK;
}

/* Compiles the text template src found at key. A template naming its own
 * call is refused here, where the message can point at it. */
static gw_tpl_t *
compile_call_tpl(ctx_t *c, const char *key, const char *src, gw_tpl_kind_t kind, const gw_tpl_scope_t *scope,
                 const gw_call_t *call)
{
    char terr[512];
    gw_tpl_t *t = gw_tpl_compile(src, kind, scope, terr, sizeof(terr));
    if (t == NULL) {
        fail_in(c, key, "%s", terr);
        return NULL;
    }
    if (gw_tpl_deps(t) & (1ULL << call->index)) {
        fail_in(c, key, "\"%s\" uses the answer of call \"%s\" itself: a call cannot wait for it", src,
                call->name);
        gw_tpl_free(t);
        return NULL;
    }
    return t;
}

static bool
call_sets_header(const gw_call_t *call, const char *name)
{
    for (size_t i = 0; i < call->nheaders; i++)
        if (strcasecmp(call->headers[i].name, name) == 0)
            return true;
    return false;
}

static bool
call_forwards_header(const gw_call_t *call, const char *name)
{
    for (size_t i = 0; i < call->nforward; i++)
        if (strcasecmp(call->forward_headers[i], name) == 0)
            return true;
    return false;
}

/* "headers": {"X-User": "{user.id}"}. */
static int
parse_call_headers(ctx_t *c, json_t *v, gw_call_t *call, const gw_tpl_scope_t *scope)
{
    push_key(c, "headers");
    int rc = GW_ERR;
    if (!json_is_object(v)) {
        fail(c, "must be an object of header names to templates, like {\"X-User\": \"{user.id}\"}");
        goto out;
    }
    call->headers = gw_calloc(json_object_size(v), sizeof(gw_call_header_t));
    const char *name;
    json_t *hv;
    json_object_foreach(v, name, hv) {
        if (!valid_token(name)) {
            fail_in(c, name, "invalid header name \"%s\"", name);
            goto out;
        }
        if (reserved_call_header(name)) {
            fail_in(c, name, "header \"%s\" is set by gatherd and cannot be configured", name);
            goto out;
        }
        if (call_sets_header(call, name)) {
            fail_in(c, name, "header \"%s\" is set twice (names ignore case)", name);
            goto out;
        }
        if (!json_is_string(hv)) {
            fail_in(c, name, "must be a string (a template), not %s", type_name(hv));
            goto out;
        }
        gw_call_header_t *h = &call->headers[call->nheaders++];
        h->name = gw_strdup(name);
        h->value = compile_call_tpl(c, name, json_string_value(hv), GW_TPL_HEADER, scope, call);
        if (h->value == NULL)
            goto out;
        call->deps |= gw_tpl_deps(h->value);
    }
    rc = GW_OK;
out:
    pop(c);
    return rc;
}

/* "forward_headers": ["Authorization", "Accept-Language"]. */
static int
parse_call_forward(ctx_t *c, json_t *v, gw_call_t *call)
{
    push_key(c, "forward_headers");
    int rc = GW_ERR;
    if (!json_is_array(v)) {
        fail(c, "must be an array of client header names, like [\"Authorization\"]");
        goto out;
    }
    call->forward_headers = gw_calloc(json_array_size(v), sizeof(char *));
    size_t i;
    json_t *e;
    json_array_foreach(v, i, e) {
        push_index(c, i);
        const char *name = json_is_string(e) ? json_string_value(e) : "";
        if (!valid_token(name)) {
            fail(c, "must be a header name like \"Accept-Language\"");
        } else if (reserved_call_header(name)) {
            fail(c, "header \"%s\" is set by gatherd and cannot be forwarded", name);
        } else if (call_forwards_header(call, name)) {
            fail(c, "header \"%s\" is listed twice (names ignore case)", name);
        } else if (call_sets_header(call, name)) {
            fail(c, "header \"%s\" is also set in \"headers\": either forward it or set it", name);
        } else {
            call->forward_headers[call->nforward++] = gw_strdup(name);
            pop(c);
            continue;
        }
        pop(c);
        goto out;
    }
    rc = GW_OK;
out:
    pop(c);
    return rc;
}

/* "after": ["a", "b"]: calls this one waits for without using their answers. */
static int
parse_call_after(ctx_t *c, json_t *v, const gw_route_t *route, gw_call_t *call)
{
    push_key(c, "after");
    int rc = GW_ERR;
    uint64_t after = 0;
    if (!json_is_array(v)) {
        fail(c, "must be an array of call names, like [\"login\"]");
        goto out;
    }
    size_t i;
    json_t *e;
    json_array_foreach(v, i, e) {
        push_index(c, i);
        long k = json_is_string(e) ? call_index(route, json_string_value(e), json_string_length(e)) : -1;
        if (!json_is_string(e)) {
            fail(c, "must be the name of a call, not %s", type_name(e));
        } else if (k < 0) {
            fail(c, "unknown call \"%s\"", json_string_value(e));
        } else if ((size_t)k == call->index) {
            fail(c, "a call cannot wait for itself");
        } else if (after & (1ULL << k)) {
            fail(c, "call \"%s\" is listed twice", json_string_value(e));
        } else {
            after |= 1ULL << k;
            pop(c);
            continue;
        }
        pop(c);
        goto out;
    }
    call->deps |= after;
    rc = GW_OK;
out:
    pop(c);
    return rc;
}

/* "foreach": "CALL", "CALL.path.to.array" or "CALL[0].items", with its
 * limits. Reads "foreach_concurrency" and "foreach_max" too, which only a
 * foreach call may have. */
static int
parse_call_foreach(ctx_t *c, json_t *v, const gw_route_t *route, gw_call_t *call)
{
    static const char *const limits[] = { "foreach_concurrency", "foreach_max" };
    json_t *fe = json_object_get(v, "foreach");
    if (fe == NULL) {
        for (size_t i = 0; i < GW_NELEM(limits); i++)
            if (json_object_get(v, limits[i]) != NULL)
                return fail_in(c, limits[i], "only for a call with \"foreach\"");
        return GW_OK;
    }
    const char *s = json_is_string(fe) ? json_string_value(fe) : "";
    size_t nlen = strcspn(s, ".[");
    if (nlen == 0)
        return fail_in(c, "foreach", "must name a call and the array in its answer, like \"orders.items\"");
    long k = call_index(route, s, nlen);
    if (k < 0)
        return fail_in(c, "foreach", "unknown call \"%.*s\"", (int)nlen, s);
    if ((size_t)k == call->index)
        return fail_in(c, "foreach", "a call cannot iterate over its own answer");
    /* The same syntax as after a call name in a template: "." starts a key
     * and "[" an index; nothing after the name means the answer itself. */
    const char *rest = s + nlen;
    if (rest[0] == '.' && (rest[1] == '\0' || rest[1] == '.' || rest[1] == '['))
        return fail_in(c, "foreach", "empty key after \".\" in \"%s\"", s);
    char jerr[256];
    call->foreach_path = gw_jpath_compile(rest[0] == '.' ? rest + 1 : rest, jerr, sizeof(jerr));
    if (call->foreach_path == NULL)
        return fail_in(c, "foreach", "%s", jerr);
    call->foreach = true;
    call->foreach_call = (size_t)k;
    call->deps |= 1ULL << k;
    long long conc = 8, max = 100;
    if (get_int(c, v, "foreach_concurrency", 1, 1024, &conc) || get_int(c, v, "foreach_max", 1, 10000, &max))
        return GW_ERR;
    call->foreach_concurrency = (unsigned)conc;
    call->foreach_max = (unsigned)max;
    return GW_OK;
}

/* A key of one JSON path step ("product"), for "into". */
static bool
into_key_ok(const json_t *x)
{
    char jerr[256];
    gw_jpath_t *p = json_is_string(x) && json_string_length(x) == strlen(json_string_value(x))
                        ? gw_jpath_compile(json_string_value(x), jerr, sizeof(jerr))
                        : NULL;
    bool key = p != NULL && gw_jpath_is_key(p);
    gw_jpath_free(p);
    return key;
}

/* "batch": {"from": "CALL.path[*].field", "param": "ids", ...} (gw_batch.h):
 * the source call and its array go where foreach's do, so that the
 * scheduler, "into" and the checks of check_into() treat both alike. */
static int
parse_call_batch(ctx_t *c, json_t *v, const gw_route_t *route, gw_call_t *call)
{
    static const char *const keys[] = { "from", "param", "separator", "max", "match", "into", "concurrency",
                                        "max_items", "max_url_bytes", NULL };
    json_t *bv = json_object_get(v, "batch");
    if (bv == NULL)
        return GW_OK;
    if (!json_is_object(bv))
        return fail_in(c, "batch", "must be an object like {\"from\": \"orders.items[*].product_id\", \"param\": "
                                   "\"ids\"}, not %s", type_name(bv));
    if (call->foreach)
        return fail_in(c, "batch", "\"batch\" and \"foreach\" cannot be used together: one request per chunk of "
                                   "values, or one per element");
    if (json_object_get(v, "into") != NULL)
        return fail_in(c, "into", "a batch call's \"into\" goes inside \"batch\"");
    push_key(c, "batch");
    int rc = GW_ERR;
    gw_batch_t *b = call->batch = gw_calloc(1, sizeof(*b));
    gw_jpath_t *from = NULL;
    if (check_keys(c, bv, keys, "\"batch\""))
        goto out;
    json_t *x = json_object_get(bv, "from");
    const char *s = json_is_string(x) ? json_string_value(x) : "";
    size_t nlen = strcspn(s, ".[");
    if (nlen == 0) {
        fail_in(c, "from", "must name a call and the values in its answer, like \"orders.items[*].product_id\"");
        goto out;
    }
    long k = call_index(route, s, nlen);
    if (k < 0) {
        fail_in(c, "from", "unknown call \"%.*s\"", (int)nlen, s);
        goto out;
    }
    if ((size_t)k == call->index) {
        fail_in(c, "from", "a call cannot read its values from its own answer");
        goto out;
    }
    const char *rest = s + nlen;
    char jerr[256];
    if (rest[0] == '.' && (rest[1] == '\0' || rest[1] == '.' || rest[1] == '[')) {
        fail_in(c, "from", "empty key after \".\" in \"%s\"", s);
        goto out;
    }
    from = gw_jpath_compile_wild(rest[0] == '.' ? rest + 1 : rest, jerr, sizeof(jerr));
    if (from == NULL) {
        fail_in(c, "from", "%s", jerr);
        goto out;
    }
    if (gw_jpath_wildcards(from) != 1) {
        fail_in(c, "from", "needs exactly one \"[*]\" (the array whose elements hold the values), as in "
                           "\"orders.items[*].product_id\"; \"%s\" has %zu", s, gw_jpath_wildcards(from));
        goto out;
    }
    gw_jpath_split_wild(from, &call->foreach_path, &b->value);
    call->foreach_call = (size_t)k;
    call->deps |= 1ULL << k;
    x = json_object_get(bv, "param");
    if (x == NULL || !json_is_string(x) || !gw_batch_param_ok(json_string_value(x), json_string_length(x))) {
        fail_in(c, "param", "must be the name of a query parameter: 1-64 characters of A-Z a-z 0-9 - . _ ~");
        goto out;
    }
    b->param = gw_strdup(json_string_value(x));
    x = json_object_get(bv, "separator");
    if (x != NULL && (!json_is_string(x) || !gw_batch_sep_ok(json_string_value(x), json_string_length(x)))) {
        fail_in(c, "separator", "must be 1-%d characters of , ; : ! $ * ' ( ) @ (a value is sent percent-encoded, "
                                "so it never holds one)", GW_BATCH_SEP_MAX);
        goto out;
    }
    snprintf(b->sep, sizeof(b->sep), "%s", x != NULL ? json_string_value(x) : ",");
    x = json_object_get(bv, "match");
    b->match = gw_jpath_compile(x == NULL ? "id" : json_is_string(x) ? json_string_value(x) : "", jerr, sizeof(jerr));
    if (b->match == NULL || (x != NULL && !json_is_string(x))) {
        fail_in(c, "match", "must be a JSON path to the field of an answer's element, like \"id\"%s%s",
                b->match ? "" : ": ", b->match ? "" : jerr);
        goto out;
    }
    x = json_object_get(bv, "into");
    if (x != NULL && !into_key_ok(x)) {
        fail_in(c, "into", "must be one key like \"product\" (no \".\", \"[\", \"]\", \"{\", \"}\" or "
                           "control character)");
        goto out;
    }
    if (x != NULL)
        call->into = gw_strdup(json_string_value(x));
    long long max = GW_BATCH_MAX_DEFAULT, conc = GW_BATCH_CONCURRENCY_DEFAULT, items = GW_BATCH_MAX_ITEMS_DEFAULT,
              url = GW_BATCH_URL_DEFAULT;
    if (get_int(c, bv, "max", 1, GW_BATCH_MAX_MAX, &max) ||
        get_int(c, bv, "concurrency", 1, GW_BATCH_CONCURRENCY_MAX, &conc) ||
        get_int(c, bv, "max_items", 1, GW_BATCH_MAX_ITEMS_MAX, &items) ||
        get_int(c, bv, "max_url_bytes", GW_BATCH_URL_MIN, GW_BATCH_URL_MAX, &url))
        goto out;
    b->max = (unsigned)max;
    b->concurrency = (unsigned)conc;
    b->max_items = (unsigned)items;
    b->max_url_bytes = (size_t)url;
    rc = GW_OK;
out:
    gw_jpath_free(from);
    pop(c);
    return rc;
}

/* "into": "product": the key each element's result is put under, in the
 * element of the source's answer it came from. Checked against the other
 * calls once they are all parsed (check_into). */
static int
parse_call_into(ctx_t *c, json_t *v, gw_call_t *call)
{
    json_t *x = json_object_get(v, "into");
    if (x == NULL)
        return GW_OK;
    if (!call->foreach)
        return fail_in(c, "into", "only for a call with \"foreach\": it puts each element's result into the element");
    if (!into_key_ok(x))
        return fail_in(c, "into", "must be one key like \"product\" (no \".\", \"[\", \"]\", \"{\", \"}\" or "
                                  "control character)");
    call->into = gw_strdup(json_string_value(x));
    return GW_OK;
}

/* "when": the call's condition (gw_cond.h), compiled against its scope. */
static int
parse_call_when(ctx_t *c, json_t *v, gw_call_t *call, const gw_tpl_scope_t *scope)
{
    gw_cond_err_t cerr;
    call->when = gw_cond_compile(v, scope, &cerr);
    if (call->when == NULL) {
        push_key(c, "when");
        for (size_t i = 0; i < cerr.nsteps; i++) {
            if (cerr.steps[i].key != NULL)
                push_key(c, cerr.steps[i].key);
            else
                push_index(c, cerr.steps[i].index);
        }
        /* on the key when the error names one, else on the condition */
        fail_at(c, cerr.nsteps > 0 && cerr.steps[cerr.nsteps - 1].key != NULL, "%s", cerr.msg);
        c->depth -= cerr.nsteps + 1;
        return GW_ERR;
    }
    uint64_t deps = gw_cond_deps(call->when);
    if (deps & (1ULL << call->index))
        return fail_in(c, "when", "names the answer of call \"%s\" itself: a call cannot wait for it", call->name);
    call->deps |= deps;
    call->reads |= deps;
    call->when_item = gw_cond_uses_item(call->when);
    return GW_OK;
}

/* "allow" or "deny": a non-empty array of JSON paths, compiled into a
 * selection. */
static int
parse_call_sel(ctx_t *c, json_t *v, const char *key, gw_jpath_sel_t **out)
{
    push_key(c, key);
    int rc = GW_ERR;
    size_t n = json_is_array(v) ? json_array_size(v) : 0;
    gw_jpath_t **paths = gw_calloc(n, sizeof(gw_jpath_t *));
    size_t np = 0;
    if (n == 0) {
        fail(c, "must be a non-empty array of JSON paths, like [\"id\", \"address.city\"]");
        goto out;
    }
    for (size_t i = 0; i < n; i++) {
        json_t *e = json_array_get(v, i);
        char jerr[256];
        push_index(c, i);
        /* "" would select the whole answer: allow would keep everything and
         * deny would remove it, both surely a mistake. */
        if (!json_is_string(e) || json_string_length(e) == 0) {
            fail(c, "must be a non-empty JSON path like \"items[0].id\"");
            pop(c);
            goto out;
        }
        paths[np] = gw_jpath_compile(json_string_value(e), jerr, sizeof(jerr));
        if (paths[np] == NULL) {
            fail(c, "%s", jerr);
            pop(c);
            goto out;
        }
        np++;
        pop(c);
    }
    *out = gw_jpath_sel_new(paths, np);
    rc = GW_OK;
out:
    for (size_t i = 0; i < np; i++)
        gw_jpath_free(paths[i]);
    free(paths);
    pop(c);
    return rc;
}

/* "rename": {"old": "new"}, kept in the order written. */
static int
parse_call_rename(ctx_t *c, json_t *v, gw_call_t *call)
{
    push_key(c, "rename");
    int rc = GW_ERR;
    if (!json_is_object(v)) {
        fail(c, "must be an object of top-level keys to new names, like {\"name\": \"full_name\"}");
        goto out;
    }
    call->rename = gw_calloc(json_object_size(v), sizeof(gw_kv_t));
    const char *old;
    json_t *nv;
    json_object_foreach(v, old, nv) {
        if (!json_is_string(nv) || json_string_length(nv) == 0) {
            fail_in(c, old, "the new name must be a non-empty string");
            goto out;
        }
        for (size_t i = 0; i < call->nrename; i++)
            if (strcmp(call->rename[i].value, json_string_value(nv)) == 0) {
                fail_in(c, old, "\"%s\" is already the new name of \"%s\"", json_string_value(nv),
                        call->rename[i].name);
                goto out;
            }
        call->rename[call->nrename].name = gw_strdup(old);
        call->rename[call->nrename].value = gw_strdup(json_string_value(nv));
        call->nrename++;
    }
    rc = GW_OK;
out:
    pop(c);
    return rc;
}

/* "group": the call's key in the aggregate, unique in the route. */
static int
parse_call_group(ctx_t *c, json_t *v, const gw_route_t *route, gw_call_t *call)
{
    json_t *g = json_object_get(v, "group");
    const char *key = g != NULL ? "group" : "name";
    if (g != NULL && call->into)
        return fail_in(c, "group", "\"group\" and \"into\" cannot be used together: a call with \"into\" has no "
                                   "key of its own, its results are in its source's answer");
    if (g != NULL && (!json_is_string(g) || json_string_length(g) == 0))
        return fail_in(c, "group", "must be a non-empty string");
    call->group = gw_strdup(g != NULL ? json_string_value(g) : call->name);
    if (call->into)
        return GW_OK; /* no key in the aggregate: nothing to collide with */
    if (strcmp(call->group, "_errors") == 0)
        return fail_in(c, key, "group \"_errors\" is reserved for the error report%s",
                       g != NULL ? "" : ": set another \"group\"");
    for (size_t i = 0; i < call->index; i++)
        if (!route->agg.calls[i]->into && strcmp(route->agg.calls[i]->group, call->group) == 0)
            return fail_in(c, key, "group \"%s\" is already the group of call \"%s\"", call->group,
                           route->agg.calls[i]->name);
    return GW_OK;
}

/* Second pass over one call: everything but its name. */
static int
parse_call(ctx_t *c, json_t *v, const gw_route_t *route, gw_call_t *call, const gw_tpl_scope_t *scope)
{
    json_t *b = json_object_get(v, "backend");
    if (b == NULL)
        return fail(c, "\"backend\" is required: the name of a backend");
    if (!json_is_string(b))
        return fail_in(c, "backend", "must be the name of a backend, not %s", type_name(b));
    call->backend = find_backend(c->cfg, json_string_value(b));
    if (call->backend == NULL)
        return fail_in(c, "backend", "unknown backend \"%s\"", json_string_value(b));

    call->method = HTTP_GET;
    json_t *m = json_object_get(v, "method");
    if (m != NULL) {
        int num = json_is_string(m) ? gw_config_method_from_name(json_string_value(m)) : -1;
        if (num == HTTP_HEAD)
            return fail_in(c, "method", "HEAD is not allowed for a call: its answer has no body to aggregate");
        if (num < 0)
            return fail_in(c, "method", "unsupported method (use one of GET, POST, PUT, DELETE, PATCH, OPTIONS)");
        call->method = num;
    }

    /* foreach first: it decides whether the templates may use {item}. */
    if (parse_call_foreach(c, v, route, call) != GW_OK || parse_call_batch(c, v, route, call) != GW_OK ||
        parse_call_into(c, v, call) != GW_OK)
        return GW_ERR;

    json_t *path = json_object_get(v, "path");
    if (path == NULL)
        return fail(c, "\"path\" is required: a template like \"/users/{id}\"");
    if (!json_is_string(path))
        return fail_in(c, "path", "must be a string like \"/users/{id}\", not %s", type_name(path));
    call->target = compile_call_tpl(c, "path", json_string_value(path), GW_TPL_TARGET, scope, call);
    if (call->target == NULL)
        return GW_ERR;
    call->deps |= gw_tpl_deps(call->target);

    json_t *x;
    if ((x = json_object_get(v, "headers")) != NULL && parse_call_headers(c, x, call, scope) != GW_OK)
        return GW_ERR;
    if ((x = json_object_get(v, "forward_headers")) != NULL && parse_call_forward(c, x, call) != GW_OK)
        return GW_ERR;

    if ((x = json_object_get(v, "body")) != NULL) {
        if (json_is_string(x) && strcmp(json_string_value(x), "forward") == 0) {
            call->forward_body = true;
        } else {
            char terr[512];
            call->body = gw_tpl_json_compile(x, scope, terr, sizeof(terr));
            if (call->body == NULL)
                return fail_in(c, "body", "%s", terr);
            if (gw_tpl_json_deps(call->body) & (1ULL << call->index))
                return fail_in(c, "body", "uses the answer of call \"%s\" itself: a call cannot wait for it",
                               call->name);
            call->deps |= gw_tpl_json_deps(call->body);
        }
    }

    call->timeout_ms = call->backend->timeout_ms;
    if (get_ms(c, v, "timeout_ms", &call->timeout_ms) != GW_OK)
        return GW_ERR;
    if (get_ms(c, v, "hedge_after_ms", &call->hedge_after_ms) != GW_OK)
        return GW_ERR;
    if (call->hedge_after_ms) {
        /* a second copy of a request that changes something could change it twice */
        if (!gw_http_idempotent(call->method))
            return fail_in(c, "hedge_after_ms", "needs an idempotent method (GET, HEAD, PUT, DELETE, OPTIONS), not %s",
                           llhttp_method_name((llhttp_method_t)call->method));
        if (call->hedge_after_ms >= call->timeout_ms)
            return fail_in(c, "hedge_after_ms", "must be below the call's timeout_ms (%d)", call->timeout_ms);
        call->backend->retry->counted = true; /* hedges count against the backend's retry budget */
    }
    if ((x = json_object_get(v, "required")) != NULL) {
        if (!json_is_boolean(x))
            return fail_in(c, "required", "must be true or false");
        call->required = json_is_true(x);
    }
    if ((x = json_object_get(v, "fallback")) != NULL) {
        /* A copy, so that the call shares nothing with the parsed file. */
        call->fallback = json_deep_copy(x);
        if (call->fallback == NULL)
            return fail_in(c, "fallback", "cannot copy the value");
    }
    if (parse_call_group(c, v, route, call) != GW_OK)
        return GW_ERR;
    call->reads = call->deps; /* templates and foreach so far; "after" only waits */
    if ((x = json_object_get(v, "after")) != NULL && parse_call_after(c, x, route, call) != GW_OK)
        return GW_ERR;
    call->needs = call->deps; /* before "when": a skipped call is only absent there */
    if ((x = json_object_get(v, "when")) != NULL && parse_call_when(c, x, call, scope) != GW_OK)
        return GW_ERR;
    if ((x = json_object_get(v, "skip_value")) != NULL) {
        /* a copy, as for fallback; whether the call can be skipped at all is
         * known once every call is parsed (check_skippable) */
        call->skip_value = json_deep_copy(x);
        if (call->skip_value == NULL)
            return fail_in(c, "skip_value", "cannot copy the value");
    }

    if ((x = json_object_get(v, "target")) != NULL) {
        char jerr[256];
        if (!json_is_string(x))
            return fail_in(c, "target", "must be a JSON path like \"data.user\", not %s", type_name(x));
        call->target_path = gw_jpath_compile(json_string_value(x), jerr, sizeof(jerr));
        if (call->target_path == NULL)
            return fail_in(c, "target", "%s", jerr);
    }
    if (json_object_get(v, "allow") != NULL && json_object_get(v, "deny") != NULL)
        return fail_in(c, "deny", "\"allow\" and \"deny\" cannot be used together: keep one");
    if ((x = json_object_get(v, "allow")) != NULL && parse_call_sel(c, x, "allow", &call->allow) != GW_OK)
        return GW_ERR;
    if ((x = json_object_get(v, "deny")) != NULL && parse_call_sel(c, x, "deny", &call->deny) != GW_OK)
        return GW_ERR;
    if ((x = json_object_get(v, "rename")) != NULL && parse_call_rename(c, x, call) != GW_OK)
        return GW_ERR;
    if (json_object_get(v, "cache") != NULL || json_object_get(v, "coalesce") != NULL) {
        /* gw_cache.c reads its settings; NULL for "coalesce": false alone */
        char cerr[256] = "";
        const char *where = "cache";
        char *servers_key = cluster_conn_key(call->backend);
        call->cache = gw_cache_scope_parse(json_object_get(v, "cache"), json_object_get(v, "coalesce"), route->pattern,
                                           call->name, call->backend->name, servers_key, call->method,
                                           call->forward_body, &where, cerr, sizeof(cerr));
        free(servers_key);
        bool top = strcmp(where, "cache") == 0 || strcmp(where, "coalesce") == 0;
        if (call->cache == NULL && cerr[0])
            return fail_in(c, top ? where : "cache", "%s%s%s", top ? "" : where, top ? "" : ": ", cerr);
    }
    return GW_OK;
}

/*
 * Finds a cycle in the calls' dependency masks with a depth-first walk and
 * writes it as "a -> b -> a" ("a" waits for "b"), starting from the cycle's
 * first call in list order so the message does not depend on the walk.
 * Returns false when there is none.
 */
static bool
find_cycle(const gw_route_t *route, char *buf, size_t len)
{
    enum { UNSEEN, ON_PATH, DONE };
    unsigned char state[GW_TPL_MAX_CALLS] = { 0 };
    size_t path[GW_TPL_MAX_CALLS], next[GW_TPL_MAX_CALLS];
    size_t n = route->agg.ncalls;
    for (size_t start = 0; start < n; start++) {
        if (state[start] != UNSEEN)
            continue;
        size_t depth = 1;
        path[0] = start;
        next[0] = 0;
        state[start] = ON_PATH;
        while (depth > 0) {
            size_t u = path[depth - 1], d = next[depth - 1];
            while (d < n && !(route->agg.calls[u]->deps & (1ULL << d)))
                d++;
            if (d == n) {
                state[u] = DONE;
                depth--;
                continue;
            }
            next[depth - 1] = d + 1;
            if (state[d] == UNSEEN) {
                state[d] = ON_PATH;
                path[depth] = d;
                next[depth] = 0;
                depth++;
                continue;
            }
            if (state[d] == DONE)
                continue;
            /* d is on the path: path[from..depth) and back to d is a cycle */
            size_t from = 0, first = 0;
            while (path[from] != d)
                from++;
            for (size_t i = from; i < depth; i++)
                if (path[i] < path[from + first])
                    first = i - from;
            size_t cycle = depth - from, w = 0;
            buf[0] = '\0';
            for (size_t i = 0; i <= cycle && w < len; i++) {
                int k = snprintf(buf + w, len - w, "%s%s", i ? " -> " : "",
                                 route->agg.calls[path[from + (first + i) % cycle]]->name);
                if (k < 0)
                    break;
                w += (size_t)k;
            }
            return true;
        }
    }
    return false;
}

/* Calls with "into": the source may not be a foreach call (its answer is
 * the array of its own results), and two calls may not put the same key
 * into the same array. The error is reported at the later call. */
static int
check_into(ctx_t *c, const gw_route_t *route)
{
    for (size_t i = 0; i < route->agg.ncalls; i++) {
        const gw_call_t *call = route->agg.calls[i];
        if (call->into == NULL)
            continue;
        const gw_call_t *src = route->agg.calls[call->foreach_call];
        const char *why = NULL;
        char msg[512];
        if (src->foreach || src->batch) {
            snprintf(msg, sizeof(msg), "cannot put results into call \"%s\": it is a %s call (its answer is the "
                                       "array of its own results)", src->name, src->foreach ? "foreach" : "batch");
            why = msg;
        }
        for (size_t j = 0; j < i && why == NULL; j++) {
            const gw_call_t *o = route->agg.calls[j];
            if (o->into && o->foreach_call == call->foreach_call && strcmp(o->into, call->into) == 0 &&
                strcmp(gw_jpath_text(o->foreach_path), gw_jpath_text(call->foreach_path)) == 0) {
                snprintf(msg, sizeof(msg), "call \"%s\" already puts \"%s\" into the elements of the same array: "
                                           "choose another key", o->name, call->into);
                why = msg;
            }
        }
        if (why != NULL) {
            push_index(c, i); /* inside "calls" */
            if (call->batch)
                push_key(c, "batch");
            fail_in(c, "into", "%s", why);
            if (call->batch)
                pop(c);
            pop(c);
            return GW_ERR;
        }
    }
    return GW_OK;
}

/* "skip_value" only on a call that can be skipped: it has "when", or it
 * needs (templates, after, foreach) a call that can be skipped. */
static int
check_skippable(ctx_t *c, const gw_route_t *route)
{
    size_t n = route->agg.ncalls;
    uint64_t can = 0;
    for (size_t i = 0; i < n; i++)
        if (route->agg.calls[i]->when)
            can |= 1ULL << i;
    for (bool changed = true; changed;) { /* the dependency graph has no cycle: at most n rounds */
        changed = false;
        for (size_t i = 0; i < n; i++)
            if (!(can & (1ULL << i)) && (route->agg.calls[i]->needs & can)) {
                can |= 1ULL << i;
                changed = true;
            }
    }
    for (size_t i = 0; i < n; i++) {
        if (route->agg.calls[i]->skip_value == NULL || (can & (1ULL << i)))
            continue;
        push_index(c, i); /* inside "calls" */
        fail_in(c, "skip_value", "the call is never skipped: it has no \"when\" and needs no call that has one");
        pop(c);
        return GW_ERR;
    }
    return GW_OK;
}

/* The keys of a route with "calls": "calls", "deadline_ms", "merge", "errors". */
static int
parse_agg(ctx_t *c, json_t *v, gw_route_t *route)
{
    route->kind = GW_ROUTE_AGGREGATE;
    route->agg.deadline_ms = 5000;
    route->agg.merge = GW_MERGE_GROUP;
    if (get_ms(c, v, "deadline_ms", &route->agg.deadline_ms) != GW_OK)
        return GW_ERR;
    json_t *x;
    if ((x = json_object_get(v, "merge")) != NULL) {
        if (json_is_string(x) && strcmp(json_string_value(x), "group") == 0)
            route->agg.merge = GW_MERGE_GROUP;
        else if (json_is_string(x) && strcmp(json_string_value(x), "merge") == 0)
            route->agg.merge = GW_MERGE_MERGE;
        else
            return fail_in(c, "merge", "must be \"group\" or \"merge\"");
    }
    if ((x = json_object_get(v, "errors")) != NULL) {
        if (!json_is_boolean(x))
            return fail_in(c, "errors", "must be true or false");
        route->agg.errors = json_is_true(x);
    }
    collect_params(route);
    for (size_t i = 0; i < route->agg.nparams; i++)
        if (reserved_tpl_name(route->agg.params[i]))
            return fail_in(c, "path",
                           "path parameter \"%s\" is reserved in a route with \"calls\" ({query.NAME}, "
                           "{header.NAME} and {item} are template sources): rename it",
                           route->agg.params[i]);

    json_t *calls = json_object_get(v, "calls");
    size_t n = json_is_array(calls) ? json_array_size(calls) : 0;
    if (n == 0)
        return fail_in(c, "calls",
                       "must be a non-empty array of calls, like [{\"name\": \"user\", \"backend\": "
                       "\"users\", \"path\": \"/users/{id}\"}]");
    if (n > GW_TPL_MAX_CALLS)
        return fail_in(c, "calls", "at most %d calls per route, not %zu", GW_TPL_MAX_CALLS, n);
    push_key(c, "calls");
    int rc = GW_ERR;
    const char **names = gw_calloc(n, sizeof(char *)); /* the scope's call names, borrowed from the calls */
    route->agg.calls = gw_calloc(n, sizeof(gw_call_t *));
    for (size_t i = 0; i < n; i++) {
        gw_call_t *call = gw_calloc(1, sizeof(gw_call_t));
        route->agg.calls[route->agg.ncalls++] = call; /* owned by the route from here on */
        call->index = i;
        push_index(c, i);
        int crc = parse_call_name(c, json_array_get(calls, i), route, call);
        pop(c);
        if (crc != GW_OK)
            goto out;
        names[i] = call->name;
    }
    for (size_t i = 0; i < n; i++) {
        json_t *cv = json_array_get(calls, i);
        gw_tpl_scope_t scope = { .params = (const char *const *)route->agg.params,
                                 .nparams = route->agg.nparams,
                                 .calls = names,
                                 .ncalls = n,
                                 .has_item = json_object_get(cv, "foreach") != NULL };
        push_index(c, i);
        int crc = parse_call(c, cv, route, route->agg.calls[i], &scope);
        pop(c);
        if (crc != GW_OK)
            goto out;
    }
    char cycle[GW_TPL_MAX_CALLS * 70];
    if (find_cycle(route, cycle, sizeof(cycle))) {
        fail(c, "dependency cycle: %s (each call waits for the next one)", cycle);
        goto out;
    }
    if (check_into(c, route) != GW_OK || check_skippable(c, route) != GW_OK)
        goto out;
    for (size_t i = 0; i < route->agg.ncalls; i++) {
        route->agg.read |= route->agg.calls[i]->reads;
        route->agg.uses_body |= route->agg.calls[i]->forward_body;
        if (route->agg.calls[i]->into)
            route->agg.enriched |= 1ULL << route->agg.calls[i]->foreach_call;
    }
    rc = GW_OK;
out:
    free(names);
    pop(c);
    return rc;
}

/* --- "log" (gw_log.h, gw_alog.h) ---------------------------------------------- */

/* A log destination: "stderr", "off" (when allowed) or an absolute or
 * relative file name. *path: NULL for stderr, else a copy. */
static int
log_dest(ctx_t *c, json_t *v, const char *key, bool can_off, bool *on, char **path)
{
    json_t *d = json_object_get(v, key);
    if (d == NULL)
        return GW_OK;
    const char *s = json_is_string(d) ? json_string_value(d) : "";
    if (s[0] == '\0' || strlen(s) != json_string_length(d) || (!can_off && strcmp(s, "off") == 0))
        return fail_in(c, key, can_off ? "must be \"off\", \"stderr\" or a file name like \"/var/log/gatherd/access.log\""
                                      : "must be \"stderr\" or a file name like \"/var/log/gatherd/error.log\"");
    free(*path);
    *path = NULL;
    *on = strcmp(s, "off") != 0;
    if (*on && strcmp(s, "stderr") != 0)
        *path = gw_strdup(s);
    return GW_OK;
}

/* "log": {"level", "error_log", "access_log", "access_format"}. */
static int
parse_log(ctx_t *c, json_t *v)
{
    static const char *const keys[] = { "level", "error_log", "access_log", "access_format", NULL };
    static const char *const levels[] = { "debug", "info", "notice", "warn", "error" };
    gw_log_conf_t *l = &c->cfg->log;
    push_key(c, "log");
    int rc = GW_ERR;
    bool err_on = true;
    json_t *d;
    if (!json_is_object(v)) {
        fail(c, "must be an object like {\"access_log\": \"/var/log/gatherd/access.log\"}");
        goto out;
    }
    if (check_keys(c, v, keys, "\"log\"") || log_dest(c, v, "error_log", false, &err_on, &l->error_path) ||
        log_dest(c, v, "access_log", true, &l->access_on, &l->access_path))
        goto out;
    if ((d = json_object_get(v, "level")) != NULL) {
        const char *s = json_is_string(d) ? json_string_value(d) : "";
        l->level = -1;
        for (size_t i = 0; i < GW_NELEM(levels); i++)
            if (strcmp(s, levels[i]) == 0)
                l->level = (int)i;
        if (l->level < 0) {
            fail_in(c, "level", "must be \"debug\", \"info\", \"notice\", \"warn\" or \"error\"");
            goto out;
        }
    }
    if ((d = json_object_get(v, "access_format")) != NULL) {
        const char *s = json_is_string(d) ? json_string_value(d) : "";
        if (strcmp(s, "combined") == 0)
            l->access_format = GW_ALOG_COMBINED;
        else if (strcmp(s, "json") == 0)
            l->access_format = GW_ALOG_JSON;
        else {
            fail_in(c, "access_format", "must be \"combined\" or \"json\"");
            goto out;
        }
    }
    rc = GW_OK;
out:
    pop(c);
    return rc;
}

/* --- trusted proxies, rate limits, max_inflight (gw_realip.h, gw_ratelimit.h) --- */

static int
parse_trusted_proxies(ctx_t *c, json_t *v)
{
    gw_config_t *cfg = c->cfg;
    push_key(c, "trusted_proxies");
    int rc = GW_OK;
    if (!json_is_array(v) || json_array_size(v) > 1024) {
        rc = fail(c, "must be an array of at most 1024 address blocks like \"10.0.0.0/8\" or \"::1/128\"");
    } else {
        cfg->trusted_proxies = gw_calloc(json_array_size(v) + 1, sizeof(gw_cidr_t));
        size_t i;
        json_t *e;
        json_array_foreach(v, i, e) {
            char msg[256];
            push_index(c, i);
            if (!json_is_string(e))
                rc = fail(c, "must be a string like \"10.0.0.0/8\", not %s", type_name(e));
            else if (gw_realip_parse_cidr(json_string_value(e), &cfg->trusted_proxies[i], msg, sizeof(msg)) != GW_OK)
                rc = fail(c, "%s", msg);
            pop(c);
            if (rc != GW_OK)
                break;
            cfg->ntrusted++;
        }
    }
    pop(c);
    return rc;
}

static int
parse_real_ip_header(ctx_t *c, json_t *v)
{
    const char *s = json_is_string(v) ? json_string_value(v) : "";
    if (strcasecmp(s, "X-Forwarded-For") == 0)
        c->cfg->real_ip_header = GW_REALIP_X_FORWARDED_FOR;
    else if (strcasecmp(s, "X-Real-IP") == 0)
        c->cfg->real_ip_header = GW_REALIP_X_REAL_IP;
    else
        return fail_in(c, "real_ip_header", "must be \"X-Forwarded-For\" or \"X-Real-IP\"");
    return GW_OK;
}

static int
rate_limit_conf(ctx_t *c, json_t *v, gw_ratelimit_conf_t *rc)
{
    static const char *const keys[] = { "rate", "period_ms", "burst", "key", "max_keys", NULL };
    if (!json_is_object(v))
        return fail(c, "must be an object like {\"rate\": 100, \"period_ms\": 1000}");
    if (check_keys(c, v, keys, "\"rate_limit\""))
        return GW_ERR;
    if (json_object_get(v, "rate") == NULL)
        return fail(c, "\"rate\" is required: the tokens added every period_ms");
    long long rate = 1, burst = 0, maxk = 10000;
    int period = 1000;
    if (get_int(c, v, "rate", 1, 10000000, &rate) || get_ms(c, v, "period_ms", &period) ||
        get_int(c, v, "burst", 1, 10000000, &burst) || get_int(c, v, "max_keys", 1, 1000000, &maxk))
        return GW_ERR;
    if (rate * 1000 > 10000000LL * period)
        return fail_in(c, "rate", "at most 10000000 per second, not %lld per %d ms", rate, period);
    rc->rate = (unsigned)rate;
    rc->period_ms = period;
    rc->burst = burst ? (unsigned)burst : (unsigned)rate;
    rc->max_keys = (unsigned)maxk;
    rc->key = GW_RL_KEY_GLOBAL;
    json_t *key = json_object_get(v, "key");
    const char *k = json_is_string(key) ? json_string_value(key) : NULL;
    if (key == NULL || (k && strcmp(k, "global") == 0))
        rc->key = GW_RL_KEY_GLOBAL;
    else if (k && strcmp(k, "client") == 0)
        rc->key = GW_RL_KEY_CLIENT;
    else if (k && strncmp(k, "header:", 7) == 0 && valid_token(k + 7))
        rc->key = GW_RL_KEY_HEADER;
    else
        return fail_in(c, "key", "must be \"global\", \"client\" or \"header:NAME\" (NAME a header name)");
    if (rc->key == GW_RL_KEY_GLOBAL && json_object_get(v, "max_keys") != NULL)
        return fail_in(c, "max_keys", "only for a keyed limit (\"key\": \"client\" or \"header:NAME\")");
    rc->header = rc->key == GW_RL_KEY_HEADER ? (char *)k + 7 : NULL; /* copied by gw_ratelimit_new() */
    return GW_OK;
}

static int
parse_rate_limit(ctx_t *c, json_t *v, gw_route_t *route)
{
    gw_ratelimit_conf_t rc;
    memset(&rc, 0, sizeof(rc));
    push_key(c, "rate_limit");
    int rv = rate_limit_conf(c, v, &rc);
    pop(c);
    if (rv == GW_OK)
        route->ratelimit = gw_ratelimit_new(&rc);
    return rv;
}

static void
backend_free(gw_backend_t *b)
{
    free(b->name);
    free(b->url);
    free(b->host_name);
    free(b->host_header);
    free(b->tls_server_name);
    free(b->conn_key);
    for (size_t i = 0; i < b->nservers; i++) {
        gw_peer_t *s = &b->servers[i];
        free(s->url);
        free(s->host_name);
        free(s->host_header);
        free(s->tls_server_name);
        free(s->label);
        free(s->conn_key);
        gw_hserver_unref(s->hs);
    }
    free(b->servers);
    gw_tpl_free(b->hash_key);
    if (b->health_check != NULL)
        free(b->health_check->path);
    free(b->health_check);
    gw_cluster_free(b->cluster);
    free(b->pools);
    SSL_CTX_free(b->ssl_ctx);
    gw_breaker_unref(b->breaker);
    gw_retry_conf_free(b->retry);
    free(b);
}

static void
route_free(gw_route_t *r)
{
    if (r == NULL)
        return;
    free(r->pattern);
    free(r->where);
    free(r->respond.head);
    free(r->respond.body);
    for (size_t i = 0; i < r->agg.ncalls; i++)
        call_free(r->agg.calls[i]);
    free(r->agg.calls);
    for (size_t i = 0; i < r->agg.nparams; i++)
        free(r->agg.params[i]);
    free(r->agg.params);
    gw_ratelimit_unref(r->ratelimit);
    free(r);
}

static int
parse_route(ctx_t *c, json_t *v, size_t index)
{
    static const char *const keys[] = { "path",        "methods", "respond", "proxy", "calls",
                                        "deadline_ms", "merge",   "errors",  "rate_limit", NULL };
    static const char *const agg_keys[] = { "deadline_ms", "merge", "errors", NULL };
    gw_config_t *cfg = c->cfg;
    if (!json_is_object(v))
        return fail(c, "a route must be an object with \"path\" and one of \"respond\", \"proxy\" or \"calls\"");
    if (check_keys(c, v, keys, "a route"))
        return GW_ERR;
    json_t *path = json_object_get(v, "path");
    if (!json_is_string(path))
        return fail(c, "\"path\" is required and must be a string like \"/users/{id}\"");
    gw_route_t *route = gw_calloc(1, sizeof(gw_route_t));
    cfg->routes = gw_realloc(cfg->routes, (cfg->nroutes + 1) * sizeof(gw_route_t *));
    cfg->routes[cfg->nroutes++] = route; /* owned by cfg from here on */
    route->pattern = gw_strdup(json_string_value(path));
    char where[512];
    snprintf(where, sizeof(where), "%s: routes[%zu]", c->name, index);
    route->where = gw_strdup(where);
    route->methods = ~0ULL;
    json_t *methods = json_object_get(v, "methods");
    if (methods != NULL && parse_methods(c, methods, &route->methods) != GW_OK)
        return GW_ERR;
    int kinds = !!json_object_get(v, "respond") + !!json_object_get(v, "proxy") + !!json_object_get(v, "calls");
    if (kinds != 1)
        return fail(c, "a route needs exactly one of \"respond\", \"proxy\" or \"calls\"");
    bool aggregate = json_object_get(v, "calls") != NULL;
    for (const char *const *k = agg_keys; !aggregate && *k; k++)
        if (json_object_get(v, *k) != NULL)
            return fail_in(c, *k, "only for routes with \"calls\"");
    if (json_object_get(v, "proxy") != NULL) {
        if (parse_proxy(c, json_object_get(v, "proxy"), route) != GW_OK)
            return GW_ERR;
    } else if (!aggregate && parse_respond(c, json_object_get(v, "respond"), route) != GW_OK) {
        return GW_ERR;
    }
    char rerr[512];
    if (gw_router_add(cfg->router, route->pattern, route->methods, route, rerr, sizeof(rerr)) != GW_OK) {
        push_key(c, "path");
        fail(c, "%s", rerr);
        pop(c);
        return GW_ERR;
    }
    /* After gw_router_add(), which has checked the pattern: the calls'
     * templates are compiled against its parameter names. */
    if (aggregate && parse_agg(c, v, route) != GW_OK)
        return GW_ERR;
    if (json_object_get(v, "rate_limit") != NULL && parse_rate_limit(c, json_object_get(v, "rate_limit"), route))
        return GW_ERR;
    return GW_OK;
}

static int
parse_routes(ctx_t *c, json_t *v)
{
    push_key(c, "routes");
    int rc = GW_OK;
    if (!json_is_array(v)) {
        rc = fail(c, "must be an array of routes");
    } else {
        size_t i;
        json_t *r;
        json_array_foreach(v, i, r) {
            push_index(c, i);
            rc = parse_route(c, r, i);
            pop(c);
            if (rc != GW_OK)
                break;
        }
    }
    pop(c);
    return rc;
}

static json_t *
load_json(const char *text, const char *name, char *err, size_t errlen)
{
    json_error_t je;
    json_t *root = json_loads(text, JSON_REJECT_DUPLICATES, &je);
    if (root == NULL) {
        snprintf(err, errlen, "%s:%d:%d: syntax error: %s", name, je.line, je.column, je.text);
        return NULL;
    }
    if (!json_is_object(root)) {
        snprintf(err, errlen, "%s:1: the configuration must be a JSON object", name);
        json_decref(root);
        return NULL;
    }
    return root;
}

static char *
read_file(const char *file, char *err, size_t errlen)
{
    FILE *f = fopen(file, "rb");
    if (f == NULL) {
        snprintf(err, errlen, "%s: cannot open: %s", file, strerror(errno));
        return NULL;
    }
    size_t cap = 4096, len = 0;
    char *buf = gw_malloc(cap);
    size_t n;
    while ((n = fread(buf + len, 1, cap - len - 1, f)) > 0) {
        len += n;
        if (cap - len - 1 == 0) {
            if (cap >= (64u << 20)) {
                snprintf(err, errlen, "%s: larger than 64 MiB", file);
                fclose(f);
                free(buf);
                return NULL;
            }
            cap *= 2;
            buf = gw_realloc(buf, cap);
        }
    }
    if (ferror(f)) {
        snprintf(err, errlen, "%s: cannot read: %s", file, strerror(errno));
        fclose(f);
        free(buf);
        return NULL;
    }
    fclose(f);
    buf[len] = '\0';
    if (strlen(buf) != len) {
        snprintf(err, errlen, "%s: contains a NUL byte", file);
        free(buf);
        return NULL;
    }
    return buf;
}

/* A folder of an include pattern that does not exist matches nothing (as
 * nginx's include does): a fresh install with no conf.d/ is valid. Any
 * other error (a folder that cannot be read) stops the load. */
static int
glob_error(const char *path, int err)
{
    GW_UNUSED(path);
    return err != ENOENT && err != ENOTDIR;
}

static int
parse_included(ctx_t *parent, const char *file)
{
    char *text = read_file(file, parent->err, parent->errlen);
    if (text == NULL)
        return GW_ERR;
    int rc = GW_ERR;
    json_t *root = load_json(text, file, parent->err, parent->errlen);
    if (root != NULL) {
        static const char *const keys[] = { "routes", NULL };
        ctx_t c = { .name = file, .text = text, .basedir = parent->basedir, .err = parent->err,
                    .errlen = parent->errlen, .cfg = parent->cfg };
        if (check_keys(&c, root, keys, "an included file (it may only hold \"routes\")") == GW_OK)
            rc = json_object_get(root, "routes") ? parse_routes(&c, json_object_get(root, "routes")) : GW_OK;
        json_decref(root);
    }
    free(text);
    return rc;
}

static int
parse_include(ctx_t *c, json_t *v)
{
    push_key(c, "include");
    int rc = GW_OK;
    if (!json_is_array(v)) {
        rc = fail(c, "must be an array of file patterns like [\"conf.d/*.json\"]");
        goto out;
    }
    size_t i;
    json_t *pat;
    json_array_foreach(v, i, pat) {
        push_index(c, i);
        if (!json_is_string(pat) || json_string_length(pat) == 0) {
            rc = fail(c, "must be a file name or pattern");
            pop(c);
            goto out;
        }
        char full[4096];
        const char *p = json_string_value(pat);
        if (p[0] == '/')
            snprintf(full, sizeof(full), "%s", p);
        else
            snprintf(full, sizeof(full), "%s/%s", c->basedir, p);
        glob_t g;
        int grc = glob(full, 0, glob_error, &g);
        if (grc == GLOB_NOMATCH && strpbrk(p, "*?[") == NULL) {
            rc = fail(c, "included file \"%s\" does not exist", full);
        } else if (grc != 0 && grc != GLOB_NOMATCH) {
            rc = fail(c, "cannot read \"%s\"", full);
        } else if (grc == 0) {
            for (size_t k = 0; k < g.gl_pathc && rc == GW_OK; k++)
                rc = parse_included(c, g.gl_pathv[k]);
        }
        if (grc != GLOB_NOMATCH)
            globfree(&g);
        pop(c);
        if (rc != GW_OK)
            goto out;
    }
out:
    pop(c);
    return rc;
}

static void
set_defaults(gw_config_t *cfg)
{
    cfg->refcnt = 1;
    cfg->workers = GW_MIN(cpu_count(), GW_CONF_MAX_WORKERS);
    cfg->max_connections = 10000;
    cfg->shutdown_timeout_ms = 10000;
    cfg->http.client_header_timeout_ms = 10000;
    cfg->http.client_body_timeout_ms = 10000;
    cfg->http.keepalive_timeout_ms = 75000;
    cfg->http.send_timeout_ms = 30000;
    cfg->http.lingering_timeout_ms = 2000;
    cfg->http.max_header_bytes = 16384;
    cfg->http.max_headers = 100;
    cfg->http.max_url_bytes = 8192;
    cfg->http.max_body_bytes = 1 << 20;
    cfg->http.max_keepalive_requests = 10000;
    cfg->memory.request_body_bytes = (size_t)256 << 20;
    cfg->memory.response_body_bytes = (size_t)512 << 20;
    cfg->cache.max_bytes = GW_CACHE_DEFAULT_MAX_BYTES;
    cfg->thread_pool.threads = (unsigned)GW_MIN(cpu_count(), 4);
    cfg->thread_pool.max_queue = 1024;
    cfg->resolver.timeout_ms = 2000;
    cfg->resolver.attempts = 2;
    cfg->resolver.min_ttl_ms = 1000;
    cfg->resolver.max_ttl_ms = 300000;
    cfg->resolver.hosts_file = gw_strdup("/etc/hosts");
    cfg->router = gw_router_new();
    cfg->log.level = GW_LOG_NOTICE;
    cfg->admin_listen = gw_calloc(1, sizeof(gw_listen_t));
    if (parse_addr(GW_ADMIN_DEFAULT_LISTEN, &cfg->admin_listen[0]) == GW_OK) {
        cfg->admin_listen[0].text = gw_strdup(GW_ADMIN_DEFAULT_LISTEN);
        cfg->nadmin = 1;
    }
}

gw_config_t *
gw_config_parse(const char *text, const char *name, const char *basedir, int workers_override, char *err,
                size_t errlen)
{
    static const char *const keys[] = { "listen", "workers", "max_connections", "shutdown_timeout_ms", "http",
                                        "resolver", "backends", "include", "routes", "pid_file", "trusted_proxies",
                                        "real_ip_header", "max_inflight", "log", "admin", "user", "group",
                                        "memory", "thread_pool", "cache", NULL };
    json_t *root = load_json(text, name, err, errlen);
    if (root == NULL)
        return NULL;
    gw_config_t *cfg = gw_calloc(1, sizeof(gw_config_t));
    set_defaults(cfg);
    cfg->file = gw_strdup(name);
    ctx_t c = { .name = name, .text = text, .basedir = basedir, .err = err, .errlen = errlen, .cfg = cfg };
    long long maxconn = cfg->max_connections;
    json_t *v;
    if (check_keys(&c, root, keys, "the configuration"))
        goto fail;
    if ((v = json_object_get(root, "listen")) == NULL) {
        snprintf(err, errlen, "%s:1: \"listen\" is required (e.g. [\"127.0.0.1:8080\"])", name);
        goto fail;
    }
    if (parse_listen(&c, v))
        goto fail;
    if ((v = json_object_get(root, "workers")) != NULL && parse_workers(&c, v))
        goto fail;
    cfg->workers_conf = cfg->workers;
    if (workers_override > 0)
        cfg->workers = GW_MIN(workers_override, GW_CONF_MAX_WORKERS);
    if (get_int(&c, root, "max_connections", 1, 10000000, &maxconn) ||
        get_ms(&c, root, "shutdown_timeout_ms", &cfg->shutdown_timeout_ms))
        goto fail;
    cfg->max_connections = (unsigned)maxconn;
    long long maxinf = 0;
    if (get_int(&c, root, "max_inflight", 1, 10000000, &maxinf) ||
        ((v = json_object_get(root, "trusted_proxies")) != NULL && parse_trusted_proxies(&c, v)) ||
        ((v = json_object_get(root, "real_ip_header")) != NULL && parse_real_ip_header(&c, v)))
        goto fail;
    cfg->max_inflight = (unsigned)maxinf;
    if ((v = json_object_get(root, "pid_file")) != NULL) {
        push_key(&c, "pid_file");
        if (!json_is_string(v) || json_string_length(v) == 0 || strlen(json_string_value(v)) != json_string_length(v)) {
            fail(&c, "must be a file name like \"/run/gatherd.pid\"");
            goto fail;
        }
        pop(&c);
        cfg->pid_file = gw_strdup(json_string_value(v));
    }
    if (parse_user(&c, root))
        goto fail;
    if ((v = json_object_get(root, "http")) != NULL && parse_http(&c, v))
        goto fail;
    if ((v = json_object_get(root, "memory")) != NULL && parse_memory(&c, v))
        goto fail;
    if ((v = json_object_get(root, "thread_pool")) != NULL && parse_thread_pool(&c, v))
        goto fail;
    if ((v = json_object_get(root, "cache")) != NULL && parse_cache(&c, v))
        goto fail;
    if ((v = json_object_get(root, "log")) != NULL && parse_log(&c, v))
        goto fail;
    if ((v = json_object_get(root, "admin")) != NULL && parse_admin(&c, v))
        goto fail;
    if ((v = json_object_get(root, "resolver")) != NULL && parse_resolver(&c, v))
        goto fail;
    if ((v = json_object_get(root, "backends")) != NULL && parse_backends(&c, v))
        goto fail;
    if ((v = json_object_get(root, "routes")) != NULL && parse_routes(&c, v))
        goto fail;
    if ((v = json_object_get(root, "include")) != NULL && parse_include(&c, v))
        goto fail;
    for (size_t i = 0; i < cfg->nbackends; i++) {
        cfg->backends[i]->pools = gw_calloc((size_t)cfg->workers * cfg->backends[i]->nservers, sizeof(gw_pool_t *));
        cfg->backends[i]->cluster = gw_cluster_new(cfg->backends[i], cfg->workers);
    }
    json_decref(root);
    return cfg;
fail:
    json_decref(root);
    gw_config_unref(cfg);
    return NULL;
}

gw_config_t *
gw_config_load(const char *file, int workers_override, char *err, size_t errlen)
{
    char *text = read_file(file, err, errlen);
    if (text == NULL)
        return NULL;
    char dir[4096];
    snprintf(dir, sizeof(dir), "%s", file);
    char *slash = strrchr(dir, '/');
    if (slash == NULL)
        snprintf(dir, sizeof(dir), ".");
    else if (slash == dir)
        dir[1] = '\0';
    else
        *slash = '\0';
    gw_config_t *cfg = gw_config_parse(text, file, dir, workers_override, err, errlen);
    free(text);
    return cfg;
}

gw_config_t *
gw_config_ref(gw_config_t *cfg)
{
    __atomic_add_fetch(&cfg->refcnt, 1, __ATOMIC_RELAXED);
    return cfg;
}

bool
gw_config_backend_same_connection(const gw_backend_t *a, const gw_backend_t *b)
{
    return a->conn_key && b->conn_key && strcmp(a->conn_key, b->conn_key) == 0;
}

void
gw_config_unref(gw_config_t *cfg)
{
    if (cfg == NULL || __atomic_sub_fetch(&cfg->refcnt, 1, __ATOMIC_ACQ_REL) != 0)
        return;
    gw_router_free(cfg->router);
    for (size_t i = 0; i < cfg->nroutes; i++)
        route_free(cfg->routes[i]);
    free(cfg->routes);
    for (size_t i = 0; i < cfg->nbackends; i++)
        backend_free(cfg->backends[i]);
    free(cfg->backends);
    for (size_t i = 0; i < cfg->nlisten; i++)
        free(cfg->listen[i].text);
    free(cfg->listen);
    for (size_t i = 0; i < cfg->nadmin; i++)
        free(cfg->admin_listen[i].text);
    free(cfg->admin_listen);
    for (size_t i = 0; i < cfg->resolver.nnameservers; i++)
        free(cfg->resolver.nameservers[i].text);
    free(cfg->resolver.nameservers);
    free(cfg->resolver.hosts_file);
    free(cfg->trusted_proxies);
    free(cfg->pid_file);
    free(cfg->user);
    free(cfg->group);
    free(cfg->log.error_path);
    free(cfg->log.access_path);
    free(cfg->file);
    free(cfg);
}
