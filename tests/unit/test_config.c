/* Unit tests for src/gw_config.c: defaults, strictness, error messages
 * with file, line and JSON path, includes, aggregate routes. */
#include "gw_config.h"
#include "gw_batch.h"
#include "gw_breaker.h"
#include "gw_cache.h"
#include "gw_cluster.h"
#include "gw_jpath.h"
#include "gw_log.h"
#include "gw_ratelimit.h"
#include "gw_retry.h"
#include "gw_router.h"
#include "gw_template.h"
#include "gw_test.h"

#include <arpa/inet.h>
#include <llhttp.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static char err[2048];

static gw_config_t *
parse(const char *text)
{
    err[0] = '\0';
    return gw_config_parse(text, "t.json", ".", 0, err, sizeof(err));
}

/* The text must be rejected with a message containing expect. */
static void
check_error(const char *text, const char *expect)
{
    gw_config_t *cfg = parse(text);
    CHECK(cfg == NULL);
    CHECK_CONTAINS(err, expect);
    gw_config_unref(cfg);
}

static void
test_minimal_and_defaults(void)
{
    gw_config_t *cfg = parse("{\"listen\": [\"127.0.0.1:8080\", \"[::1]:8080\", \"*:81\", \"82\"]}");
    CHECK(cfg != NULL);
    if (cfg == NULL) {
        printf("    %s\n", err);
        return;
    }
    CHECK(cfg->nlisten == 4);
    CHECK(cfg->listen[1].addr.ss_family == AF_INET6);
    CHECK(cfg->workers >= 1);
    CHECK(cfg->max_connections == 10000);
    CHECK(cfg->http.max_header_bytes == 16384);
    CHECK(cfg->http.keepalive_timeout_ms == 75000);
    CHECK(cfg->nroutes == 0);
    gw_config_unref(cfg);
}

static void
test_full(void)
{
    gw_config_t *cfg = parse("{\"listen\": \"127.0.0.1:1\", \"workers\": 3, \"max_connections\": 5,\n"
                             " \"shutdown_timeout_ms\": 250,\n"
                             " \"http\": {\"max_body_bytes\": 10, \"keepalive_timeout_ms\": 1000},\n"
                             " \"routes\": [{\"path\": \"/h\", \"methods\": [\"GET\"],\n"
                             "   \"respond\": {\"status\": 201, \"headers\": {\"X-A\": \"b\"}, \"body\": {\"k\": [1]}}}]}");
    CHECK(cfg != NULL);
    if (cfg == NULL) {
        printf("    %s\n", err);
        return;
    }
    CHECK(cfg->workers == 3 && cfg->max_connections == 5 && cfg->shutdown_timeout_ms == 250);
    CHECK(cfg->http.max_body_bytes == 10 && cfg->http.keepalive_timeout_ms == 1000);
    CHECK(cfg->nroutes == 1);
    CHECK(cfg->routes[0]->respond.status == 201);
    CHECK_STR(cfg->routes[0]->respond.body, "{\"k\":[1]}");
    CHECK_STR(cfg->routes[0]->respond.head, "X-A: b\r\nContent-Type: application/json\r\n");
    gw_config_unref(cfg);
}

static void
test_text_body(void)
{
    gw_config_t *cfg = parse("{\"listen\": [\"1\"], \"routes\": [{\"path\": \"/t\", \"respond\": {\"body\": \"a\\nb\"}}]}");
    CHECK(cfg != NULL);
    if (cfg == NULL)
        return;
    CHECK_STR(cfg->routes[0]->respond.body, "a\nb");
    CHECK_STR(cfg->routes[0]->respond.head, "Content-Type: text/plain; charset=utf-8\r\n");
    gw_config_unref(cfg);
}

static void
test_workers_override(void)
{
    gw_config_t *cfg = gw_config_parse("{\"listen\": [\"1\"], \"workers\": 4}", "t.json", ".", 2, err, sizeof(err));
    CHECK(cfg != NULL && cfg->workers == 2);
    gw_config_unref(cfg);
}

static void
test_syntax_error_has_line_and_column(void)
{
    check_error("{\"listen\": [\"1\"],\n \"workers\": 2,,\n}", "t.json:2:");
    check_error("{\"listen\": [\"1\"], \"listen\": [\"2\"]}", "duplicate object key");
    check_error("[1]", "must be a JSON object");
}

static void
test_unknown_keys_with_line(void)
{
    check_error("{\"listen\": [\"1\"],\n\n \"wrokers\": 2}", "t.json:3: wrokers: unknown key \"wrokers\"");
    check_error("{\"listen\": [\"1\"], \"http\": {\n \"max_body\": 1}}", "t.json:2: http.max_body: unknown key");
    check_error("{\"listen\": [\"1\"], \"routes\": [\n {\"path\": \"/\", \"respond\": {}},\n"
                " {\"path\": \"/x\", \"respond\": {\"stauts\": 200}}]}",
                "t.json:3: routes[1].respond.stauts: unknown key");
}

static void
test_types_and_ranges(void)
{
    check_error("{\"listen\": [\"1\"], \"workers\": \"many\"}", "workers: must be \"auto\" or an integer");
    check_error("{\"listen\": [\"1\"], \"workers\": 0}", "workers: must be");
    check_error("{\"listen\": [\"1\"], \"max_connections\": \"5\"}", "max_connections: must be an integer, not a string");
    check_error("{\"listen\": [\"1\"], \"http\": {\"max_headers\": 0}}", "http.max_headers: must be between 1 and");
    check_error("{\"listen\": [\"1\"], \"routes\": [{\"path\": \"/\", \"respond\": {\"status\": 99}}]}",
                "routes[0].respond.status: must be between 200 and 599, not 99");
    check_error("{\"listen\": [\"1\"], \"routes\": {}}", "routes: must be an array");
    check_error("{\"workers\": 1}", "\"listen\" is required");
}

static void
test_bad_addresses(void)
{
    static const char *const bad[] = { "localhost:80", "1.2.3.4", "1.2.3.4:0", "1.2.3.4:65536", "[::1]", "::1:80",
                                       "[::1]80", "1.2.3.4:8x", "300.1.1.1:80", "[1.2.3.4]:80", "" };
    for (size_t i = 0; i < GW_NELEM(bad); i++) {
        char text[256];
        snprintf(text, sizeof(text), "{\"listen\": [\"127.0.0.1:1\", \"%s\"]}", bad[i]);
        check_error(text, "listen[1]: bad address");
    }
    check_error("{\"listen\": [\"127.0.0.1:1\", \"127.0.0.1:1\"]}", "listen[1]: address \"127.0.0.1:1\" is listed twice");
}

static void
test_routes(void)
{
    check_error("{\"listen\": [\"1\"], \"routes\": [\n{\"path\": \"/a\", \"respond\": {}},\n"
                "{\"path\": \"/a\", \"methods\": [\"GET\"], \"respond\": {}}]}",
                "t.json:3: routes[1].path: duplicate route: GET, HEAD /a is already defined by t.json: routes[0]");
    check_error("{\"listen\": [\"1\"], \"routes\": [{\"path\": \"/a\"}]}", "needs exactly one of");
    check_error("{\"listen\": [\"1\"], \"routes\": [{\"path\": \"/a\", \"respond\": {}, \"proxy\": {}}]}",
                "needs exactly one of");
    check_error("{\"listen\": [\"1\"], \"routes\": [{\"path\": \"/a\", \"calls\": []}]}",
                "routes[0].calls: must be a non-empty array of calls");
    check_error("{\"listen\": [\"1\"], \"routes\": [{\"path\": \"/a\", \"methods\": [\"BREW\"], \"respond\": {}}]}",
                "routes[0].methods[0]: unsupported method");
    check_error("{\"listen\": [\"1\"], \"routes\": [{\"path\": \"/a\", \"methods\": [], \"respond\": {}}]}",
                "routes[0].methods: must be a non-empty array");
    check_error("{\"listen\": [\"1\"], \"routes\": [{\"path\": \"a\", \"respond\": {}}]}",
                "routes[0].path: path pattern must start with");
    check_error("{\"listen\": [\"1\"], \"routes\": [{\"path\": \"/a\", \"respond\": {\"headers\": "
                "{\"Content-Length\": \"5\"}}}]}",
                "routes[0].respond.headers.Content-Length: header \"Content-Length\" is set by gatherd");
    check_error("{\"listen\": [\"1\"], \"routes\": [{\"path\": \"/a\", \"respond\": {\"headers\": "
                "{\"X-A\": \"a\\r\\nX-B: b\"}}}]}",
                "control character");
    check_error("{\"listen\": [\"1\"], \"routes\": [{\"path\": \"/a\", \"respond\": {\"headers\": "
                "{\"X A\": \"a\"}}}]}",
                "invalid header name");
}

#define B "{\"listen\": [\"1\"], \"backends\": {\"users\": "

static void
test_backends_and_proxy(void)
{
    gw_config_t *cfg = parse(B "{\"url\": \"http://127.0.0.1:9101\", \"timeout_ms\": 500},\n"
                               "  \"v6\": {\"url\": \"http://[::1]\"}},\n"
                             " \"routes\": [{\"path\": \"/legacy/*\", \"proxy\": {\"backend\": \"users\", "
                             "\"strip_prefix\": \"/legacy\", \"preserve_host\": true}}]}");
    CHECK(cfg != NULL);
    if (cfg == NULL) {
        printf("    %s\n", err);
        return;
    }
    CHECK(cfg->nbackends == 2);
    CHECK_STR(cfg->backends[0]->host_header, "127.0.0.1:9101");
    CHECK(cfg->backends[0]->timeout_ms == 500 && cfg->backends[0]->connect_timeout_ms == 1000);
    /* idle connections are kept up to max_connections unless max_idle says fewer */
    CHECK(cfg->backends[0]->max_connections == 256 && cfg->backends[0]->max_idle == 256);
    CHECK_STR(cfg->backends[1]->host_header, "[::1]:80");
    CHECK(cfg->routes[0]->kind == GW_ROUTE_PROXY && cfg->routes[0]->proxy.backend == cfg->backends[0]);
    CHECK(cfg->routes[0]->proxy.strip_segments == 1 && cfg->routes[0]->proxy.preserve_host);
    gw_config_unref(cfg);

    check_error(B "{\"url\": \"http://127.0.0.1:1\"}},\n \"routes\": [{\"path\": \"/a\",\n"
                  " \"proxy\": {\"backend\": \"userz\"}}]}",
                "t.json:3: routes[0].proxy.backend: unknown backend \"userz\"");
    check_error(B "{\"url\": \"http://127.0.0.1:1\"}}, \"routes\": [{\"path\": \"/a/*\", "
                  "\"proxy\": {\"backend\": \"users\", \"strip_prefix\": \"/b\"}}]}",
                "routes[0].proxy.strip_prefix: \"/b\" is not a literal prefix");
    check_error(B "{\"url\": \"127.0.0.1:1\"}}}", "backends.users.url: must start with http://");
    check_error(B "{\"url\": \"http://127.0.0.1\", \"tls\": {}}}}", "backends.users.tls: \"tls\" needs an https:// url");
    check_error(B "{\"url\": \"https://127.0.0.1\", \"tls\": {\"ca_file\": \"/nonexistent.pem\"}}}}",
                "backends.users.tls.ca_file: cannot load \"/nonexistent.pem\"");
    check_error(B "{\"url\": \"https://127.0.0.1\", \"tls\": {\"cert_file\": \"/x.pem\"}}}}", "go together");
    check_error(B "{\"url\": \"https://127.0.0.1\", \"tls\": {\"verify\": \"no\"}}}}", "tls.verify: must be true or false");
    check_error(B "{\"url\": \"http://-users.internal:80\"}}}", "backends.users.url: bad host name \"-users.internal\"");
    check_error(B "{\"url\": \"http://127.0.0.1:1/api\"}}}", "backends.users.url: a backend URL has no path");
    check_error(B "{\"url\": \"http://127.0.0.1:99999\"}}}", "backends.users.url: bad address");
    check_error(B "{\"url\": \"http://127.0.0.1:1\", \"max_idle\": -1}}}", "backends.users.max_idle: must be between");
    check_error(B "{\"url\": \"http://127.0.0.1:1\", \"retries\": 1}}}", "backends.users.retries: unknown key");

    /* max_idle: max_connections by default, as given below it, and above it
     * (never reachable) the same as max_connections */
    static const struct {
        const char *keys;
        unsigned maxc, maxi;
    } idle[] = {
        { "", 256, 256 },
        { ", \"max_connections\": 32", 32, 32 },
        { ", \"max_idle\": 8", 256, 8 },
        { ", \"max_idle\": 0", 256, 0 },
        { ", \"max_connections\": 32, \"max_idle\": 64", 32, 32 },
        { ", \"max_idle\": 1000", 256, 256 },
    };
    for (size_t i = 0; i < sizeof(idle) / sizeof(idle[0]); i++) {
        char text[256];
        snprintf(text, sizeof(text), B "{\"url\": \"http://127.0.0.1:1\"%s}}}", idle[i].keys);
        cfg = parse(text);
        CHECK(cfg != NULL);
        if (cfg == NULL) {
            printf("    %s: %s\n", text, err);
            continue;
        }
        CHECK(cfg->backends[0]->max_connections == idle[i].maxc && cfg->backends[0]->max_idle == idle[i].maxi);
        gw_config_unref(cfg);
    }
}

/* --- aggregate routes ------------------------------------------------------ */

/* Aggregate routes in C strings are hard to read with \" everywhere, so
 * these tests write JSON with single quotes and q() turns them into double
 * quotes (none of the texts needs a real single quote). */
static const char *
q(const char *s)
{
    static char buf[16384];
    size_t n = strlen(s);
    if (n >= sizeof(buf))
        n = sizeof(buf) - 1;
    for (size_t i = 0; i < n; i++)
        buf[i] = s[i] == '\'' ? '"' : s[i];
    buf[n] = '\0';
    return buf;
}

/* users has timeout_ms 700, orders the default (30000). */
#define AGG                                                                                                            \
    "{'listen': ['1'], 'backends': {'users': {'url': 'http://127.0.0.1:9101', 'timeout_ms': 700},\n"                   \
    " 'orders': {'url': 'http://127.0.0.1:9102'}},\n 'routes': ["

/* The route "/a/{id}" with these calls (single-quoted JSON) must be
 * rejected with a message containing expect. */
static void
check_calls_error(const char *calls, const char *expect)
{
    char text[12288];
    snprintf(text, sizeof(text), AGG "{'path': '/a/{id}', 'calls': [%s]}]}", calls);
    check_error(q(text), expect);
}

static void
test_aggregate_route(void)
{
    gw_config_t *cfg = parse(q(AGG "{'path': '/dash/{id}', 'methods': ['GET'], 'deadline_ms': 800, 'merge': 'merge',\n"
                                   "  'errors': true, 'calls': [\n"
                                   " {'name': 'customer', 'backend': 'users', 'path': '/users/{id}',\n"
                                   "  'required': true, 'allow': ['id', 'name']},\n"
                                   " {'name': 'orders', 'backend': 'orders', 'method': 'POST', 'path': "
                                   "'/orders?user={customer.id}',\n"
                                   "  'headers': {'X-User': '{customer.id}', 'Accept': 'application/json'},\n"
                                   "  'forward_headers': ['Authorization'],\n"
                                   "  'body': {'user': '{customer.id}', 'q': '{query.q}'}, 'target': 'items',\n"
                                   "  'fallback': null, 'group': 'my_orders', 'rename': {'a': 'b', 'c': 'd'}},\n"
                                   " {'name': 'products', 'backend': 'orders', 'path': '/products/{item.product_id}',\n"
                                   "  'foreach': 'orders.items', 'foreach_concurrency': 4, 'foreach_max': 20,\n"
                                   "  'deny': ['internal', 'x.y'], 'timeout_ms': 50},\n"
                                   " {'name': 'recs', 'backend': 'users', 'method': 'PUT', 'path': "
                                   "'/recs?lang={query.lang}',\n"
                                   "  'after': ['customer'], 'body': 'forward'},\n"
                                   " {'name': 'each', 'backend': 'users', 'path': '/e/{item}', 'foreach': 'recs'},\n"
                                   " {'name': 'later', 'backend': 'users', 'path': '/l/{zlast.id}'},\n"
                                   " {'name': 'zlast', 'backend': 'users', 'path': '/z', 'fallback': {'items': []}}\n"
                                   "]}]}"));
    CHECK(cfg != NULL);
    if (cfg == NULL) {
        printf("    %s\n", err);
        return;
    }
    gw_route_t *r = cfg->routes[0];
    CHECK(r->kind == GW_ROUTE_AGGREGATE);
    CHECK(r->agg.ncalls == 7 && r->agg.deadline_ms == 800 && r->agg.merge == GW_MERGE_MERGE && r->agg.errors);
    CHECK(r->agg.nparams == 1);
    CHECK_STR(r->agg.params[0], "id");
    gw_call_t *const *c = (gw_call_t *const *)r->agg.calls;
    for (size_t i = 0; i < r->agg.ncalls; i++)
        CHECK(c[i]->index == i);

    CHECK_STR(c[0]->name, "customer");
    CHECK(c[0]->backend == cfg->backends[0] && c[0]->method == HTTP_GET && c[0]->deps == 0);
    CHECK_STR(c[0]->group, "customer");
    CHECK(c[0]->required && c[0]->fallback == NULL && c[0]->timeout_ms == 700);
    CHECK(c[0]->allow != NULL && c[0]->deny == NULL && !c[0]->foreach && c[0]->target_path == NULL);
    CHECK_STR(gw_tpl_source(c[0]->target), "/users/{id}");

    CHECK(c[1]->backend == cfg->backends[1] && c[1]->method == HTTP_POST && c[1]->deps == 1);
    CHECK(!c[1]->required && c[1]->timeout_ms == 30000);
    CHECK(c[1]->nheaders == 2);
    if (c[1]->nheaders == 2) {
        CHECK_STR(c[1]->headers[0].name, "X-User");
        CHECK(gw_tpl_deps(c[1]->headers[0].value) == 1 && gw_tpl_deps(c[1]->headers[1].value) == 0);
    }
    CHECK(c[1]->nforward == 1);
    if (c[1]->nforward == 1)
        CHECK_STR(c[1]->forward_headers[0], "Authorization");
    CHECK(c[1]->body != NULL && gw_tpl_json_deps(c[1]->body) == 1 && !c[1]->forward_body);
    CHECK(c[1]->target_path != NULL && strcmp(gw_jpath_text(c[1]->target_path), "items") == 0);
    CHECK(c[1]->fallback != NULL && json_is_null(c[1]->fallback));
    CHECK_STR(c[1]->group, "my_orders");
    CHECK(c[1]->nrename == 2);
    if (c[1]->nrename == 2) {
        CHECK_STR(c[1]->rename[0].name, "a");
        CHECK_STR(c[1]->rename[0].value, "b");
        CHECK_STR(c[1]->rename[1].name, "c");
        CHECK_STR(c[1]->rename[1].value, "d");
    }

    CHECK(c[2]->foreach && c[2]->foreach_call == 1 && c[2]->foreach_concurrency == 4 && c[2]->foreach_max == 20);
    CHECK(c[2]->foreach_path != NULL && strcmp(gw_jpath_text(c[2]->foreach_path), "items") == 0);
    CHECK(c[2]->deps == 1u << 1 && c[2]->deny != NULL && c[2]->allow == NULL && c[2]->timeout_ms == 50);

    CHECK(c[3]->method == HTTP_PUT && c[3]->forward_body && c[3]->body == NULL && c[3]->deps == 1);
    CHECK(!c[3]->foreach && c[3]->foreach_path == NULL);

    CHECK(c[4]->foreach && c[4]->foreach_call == 3 && gw_jpath_is_root(c[4]->foreach_path));
    CHECK(c[4]->foreach_concurrency == 8 && c[4]->foreach_max == 100 && c[4]->deps == 1u << 3);

    CHECK(c[5]->deps == 1u << 6); /* a template may name a call listed later */
    CHECK(c[6]->fallback != NULL && json_is_object(c[6]->fallback));

    /* the route is in the router as before */
    gw_path_t path = { 0 };
    gw_match_t m;
    CHECK(gw_router_normalize("/dash/7", 7, &path) == GW_OK);
    CHECK(gw_router_match(cfg->router, HTTP_GET, &path, &m) == GW_ROUTE_FOUND && m.route == r);
    gw_path_free(&path);
    gw_config_unref(cfg);

    /* defaults of the route, and the most calls a route may have */
    char text[12288];
    size_t w = (size_t)snprintf(text, sizeof(text), "%s", AGG "{'path': '/m', 'calls': [");
    for (int i = 0; i < GW_TPL_MAX_CALLS; i++)
        w += (size_t)snprintf(text + w, sizeof(text) - w, "%s{'name': 'c%d', 'backend': 'users', 'path': '/'}",
                              i ? ", " : "", i);
    snprintf(text + w, sizeof(text) - w, "]}]}");
    cfg = parse(q(text));
    CHECK(cfg != NULL);
    if (cfg == NULL) {
        printf("    %s\n", err);
        return;
    }
    r = cfg->routes[0];
    CHECK(r->agg.ncalls == GW_TPL_MAX_CALLS && r->agg.nparams == 0);
    CHECK(r->agg.deadline_ms == 5000 && r->agg.merge == GW_MERGE_GROUP && !r->agg.errors);
    gw_config_unref(cfg);
    snprintf(text + w, sizeof(text) - w, ", {'name': 'one_more', 'backend': 'users', 'path': '/'}]}]}");
    check_error(q(text), "routes[0].calls: at most 64 calls per route, not 65");
}

static void
test_aggregate_route_keys(void)
{
    check_error(q(AGG "{'path': '/a', 'calls': {}}]}"), "routes[0].calls: must be a non-empty array of calls");
    check_error(q(AGG "{'path': '/a', 'respond': {}, 'deadline_ms': 100}]}"),
                "routes[0].deadline_ms: only for routes with \"calls\"");
    check_error(q(AGG "{'path': '/a', 'proxy': {'backend': 'users'}, 'merge': 'group'}]}"),
                "routes[0].merge: only for routes with \"calls\"");
    check_error(q(AGG "{'path': '/a', 'respond': {}, 'errors': true}]}"),
                "routes[0].errors: only for routes with \"calls\"");
    const char *call = "[{'name': 'a', 'backend': 'users', 'path': '/'}]";
    char text[1024];
    snprintf(text, sizeof(text), AGG "{'path': '/a', 'merge': 'deep', 'calls': %s}]}", call);
    check_error(q(text), "routes[0].merge: must be \"group\" or \"merge\"");
    snprintf(text, sizeof(text), AGG "{'path': '/a', 'errors': 1, 'calls': %s}]}", call);
    check_error(q(text), "routes[0].errors: must be true or false");
    snprintf(text, sizeof(text), AGG "{'path': '/a', 'deadline_ms': 0, 'calls': %s}]}", call);
    check_error(q(text), "routes[0].deadline_ms: must be between 1 and 86400000, not 0");
    snprintf(text, sizeof(text), AGG "{'path': '/a', 'deadline_ms': 86400001, 'calls': %s}]}", call);
    check_error(q(text), "routes[0].deadline_ms: must be between");
    snprintf(text, sizeof(text), AGG "{'path': '/a/{item}', 'calls': %s}]}", call);
    check_error(q(text), "routes[0].path: path parameter \"item\" is reserved");
    snprintf(text, sizeof(text), AGG "{'path': '/a/{x y}', 'calls': %s}]}", call);
    check_error(q(text), "routes[0].path: parameter name \"x y\"");
    snprintf(text, sizeof(text), AGG "{'path': '/a', 'calls': %s}, {'path': '/a', 'calls': %s}]}", call, call);
    check_error(q(text), "routes[1].path: duplicate route");
}

static void
test_aggregate_call_errors(void)
{
    check_calls_error("1", "routes[0].calls[0]: a call must be an object");
    check_calls_error("{'name': 'a', 'backend': 'users', 'path': '/', 'tmeout_ms': 5}",
                      "routes[0].calls[0].tmeout_ms: unknown key \"tmeout_ms\" in a call");
    check_calls_error("{'backend': 'users', 'path': '/'}", "routes[0].calls[0]: \"name\" is required");
    check_calls_error("{'name': 'a', 'path': '/'}", "routes[0].calls[0]: \"backend\" is required");
    check_calls_error("{'name': 'a', 'backend': 'users'}", "routes[0].calls[0]: \"path\" is required");
    check_calls_error("{'name': 'a', 'backend': 'users', 'path': 5}", "routes[0].calls[0].path: must be a string");
    check_calls_error("{'name': 'a', 'backend': 'nope', 'path': '/'}",
                      "routes[0].calls[0].backend: unknown backend \"nope\"");
    check_calls_error("{'name': 'a', 'backend': 'users', 'path': '/'}, {'name': 'a', 'backend': 'users', 'path': '/'}",
                      "routes[0].calls[1].name: \"a\" is already the name of calls[0]");
    static const char *const reserved[] = { "query", "header", "item" };
    for (size_t i = 0; i < GW_NELEM(reserved); i++) {
        char calls[256];
        snprintf(calls, sizeof(calls), "{'name': '%s', 'backend': 'users', 'path': '/'}", reserved[i]);
        check_calls_error(calls, "routes[0].calls[0].name: \"");
        check_calls_error(calls, "\" is reserved in templates");
    }
    static const char *const bad_names[] = { "", "a.b", "a b", "é",
                                             "a2345678901234567890123456789012345678901234567890123456789012345" };
    for (size_t i = 0; i < GW_NELEM(bad_names); i++) {
        char calls[256];
        snprintf(calls, sizeof(calls), "{'name': '%s', 'backend': 'users', 'path': '/'}", bad_names[i]);
        check_calls_error(calls, "routes[0].calls[0].name: must be 1-64 characters of A-Z a-z 0-9 _ -");
    }
    check_calls_error("{'name': 5, 'backend': 'users', 'path': '/'}", "routes[0].calls[0].name: must be 1-64");
    gw_config_t *cfg = parse(q(AGG "{'path': '/a', 'calls': [{'name': "
                                   "'A_-4567890123456789012345678901234567890123456789012345678901234', "
                                   "'backend': 'users', 'path': '/'}]}]}"));
    CHECK(cfg != NULL);
    gw_config_unref(cfg);
    check_calls_error("{'name': 'id', 'backend': 'users', 'path': '/'}",
                      "routes[0].calls[0].name: \"id\" is also a path parameter of the route");
    check_calls_error("{'name': 'a', 'backend': 'users', 'path': '/', 'method': 'HEAD'}",
                      "routes[0].calls[0].method: HEAD is not allowed for a call");
    check_calls_error("{'name': 'a', 'backend': 'users', 'path': '/', 'method': 'BREW'}",
                      "routes[0].calls[0].method: unsupported method (use one of GET, POST");
    check_calls_error("{'name': 'a', 'backend': 'users', 'path': '/', 'timeout_ms': 0}",
                      "routes[0].calls[0].timeout_ms: must be between 1 and");
    check_calls_error("{'name': 'a', 'backend': 'users', 'path': '/', 'required': 'yes'}",
                      "routes[0].calls[0].required: must be true or false");
}

static void
test_aggregate_templates(void)
{
    check_calls_error("{'name': 'a', 'backend': 'users', 'path': '/u/{usr.id}'}",
                      "routes[0].calls[0].path: unknown name \"usr\" in \"{usr.id}\"");
    check_calls_error("{'name': 'a', 'backend': 'users', 'path': 'u/{id}'}", "routes[0].calls[0].path: ");
    check_calls_error("{'name': 'a', 'backend': 'users', 'path': '/u/{item.id}'}",
                      "routes[0].calls[0].path: \"{item.id}\": item exists only in a call with \"foreach\"");
    check_calls_error("{'name': 'a', 'backend': 'users', 'path': '/', 'headers': {'X-A': '{item}'}}",
                      "routes[0].calls[0].headers.X-A: \"{item}\": item exists only in a call with \"foreach\"");
    check_calls_error("{'name': 'a', 'backend': 'users', 'path': '/', 'body': {'items': [1, '{nope}']}}",
                      "routes[0].calls[0].body: items[1]: unknown name \"nope\"");
    check_calls_error("{'name': 'a', 'backend': 'users', 'path': '/', 'headers': {'X-A': 5}}",
                      "routes[0].calls[0].headers.X-A: must be a string");
    /* a call waiting for itself */
    check_calls_error("{'name': 'self', 'backend': 'users', 'path': '/{self.id}'}",
                      "routes[0].calls[0].path: \"/{self.id}\" uses the answer of call \"self\" itself");
    check_calls_error("{'name': 'self', 'backend': 'users', 'path': '/', 'headers': {'X-A': '{self}'}}",
                      "routes[0].calls[0].headers.X-A: \"{self}\" uses the answer of call \"self\" itself");
    check_calls_error("{'name': 'self', 'backend': 'users', 'path': '/', 'body': ['{self.id}']}",
                      "routes[0].calls[0].body: uses the answer of call \"self\" itself");
    check_calls_error("{'name': 'a', 'backend': 'users', 'path': '/', 'after': ['a']}",
                      "routes[0].calls[0].after[0]: a call cannot wait for itself");
    check_calls_error("{'name': 'a', 'backend': 'users', 'path': '/', 'after': ['b']}",
                      "routes[0].calls[0].after[0]: unknown call \"b\"");
    check_calls_error("{'name': 'a', 'backend': 'users', 'path': '/'}, "
                      "{'name': 'b', 'backend': 'users', 'path': '/', 'after': ['a', 'a']}",
                      "routes[0].calls[1].after[1]: call \"a\" is listed twice");
    check_calls_error("{'name': 'a', 'backend': 'users', 'path': '/', 'after': 'b'}",
                      "routes[0].calls[0].after: must be an array of call names");
    /* cycles, named from the first call of the cycle in list order */
    check_calls_error("{'name': 'a', 'backend': 'users', 'path': '/{b.id}'}, "
                      "{'name': 'b', 'backend': 'users', 'path': '/{a.id}'}",
                      "routes[0].calls: dependency cycle: a -> b -> a");
    check_calls_error("{'name': 'a', 'backend': 'users', 'path': '/{b.id}'}, "
                      "{'name': 'b', 'backend': 'users', 'path': '/', 'headers': {'X-C': '{c}'}}, "
                      "{'name': 'c', 'backend': 'users', 'path': '/', 'after': ['a']}",
                      "routes[0].calls: dependency cycle: a -> b -> c -> a");
    check_calls_error("{'name': 'x', 'backend': 'users', 'path': '/'}, "
                      "{'name': 'c', 'backend': 'users', 'path': '/', 'body': {'k': '{a.id}'}}, "
                      "{'name': 'b', 'backend': 'users', 'path': '/{c.id}', 'after': ['x']}, "
                      "{'name': 'a', 'backend': 'users', 'path': '/', 'foreach': 'b.items'}",
                      "routes[0].calls: dependency cycle: c -> a -> b -> c");
}

static void
test_aggregate_headers(void)
{
    static const char *const reserved[] = { "Host", "content-length", "Transfer-Encoding", "Connection",
                                            "Keep-Alive", "TE", "Trailer", "Upgrade", "Expect",
                                            "Proxy-Connection", "X-Request-Id", "x-forwarded-for",
                                            "X-Forwarded-Proto", "Via" };
    for (size_t i = 0; i < GW_NELEM(reserved); i++) {
        char calls[512], expect[256];
        snprintf(calls, sizeof(calls), "{'name': 'a', 'backend': 'users', 'path': '/', 'headers': {'%s': 'x'}}",
                 reserved[i]);
        snprintf(expect, sizeof(expect), "routes[0].calls[0].headers.%s: header \"%s\" is set by gatherd", reserved[i],
                 reserved[i]);
        check_calls_error(calls, expect);
        snprintf(calls, sizeof(calls), "{'name': 'a', 'backend': 'users', 'path': '/', 'forward_headers': ['%s']}",
                 reserved[i]);
        snprintf(expect, sizeof(expect), "routes[0].calls[0].forward_headers[0]: header \"%s\" is set by gatherd",
                 reserved[i]);
        check_calls_error(calls, expect);
    }
    check_calls_error("{'name': 'a', 'backend': 'users', 'path': '/', 'headers': {'X A': 'x'}}",
                      "routes[0].calls[0].headers.X A: invalid header name");
    check_calls_error("{'name': 'a', 'backend': 'users', 'path': '/', 'headers': {'X-A': 'x', 'x-a': 'y'}}",
                      "routes[0].calls[0].headers.x-a: header \"x-a\" is set twice");
    check_calls_error("{'name': 'a', 'backend': 'users', 'path': '/', 'headers': {'X-A': 'a\\r\\nX-B: b'}}",
                      "routes[0].calls[0].headers.X-A: ");
    check_calls_error("{'name': 'a', 'backend': 'users', 'path': '/', 'forward_headers': ['Accept', 'accept']}",
                      "routes[0].calls[0].forward_headers[1]: header \"accept\" is listed twice");
    check_calls_error("{'name': 'a', 'backend': 'users', 'path': '/', 'forward_headers': ['A B']}",
                      "routes[0].calls[0].forward_headers[0]: must be a header name");
    check_calls_error("{'name': 'a', 'backend': 'users', 'path': '/', 'forward_headers': 'Accept'}",
                      "routes[0].calls[0].forward_headers: must be an array");
    check_calls_error("{'name': 'a', 'backend': 'users', 'path': '/', 'headers': {'Accept': 'x'},"
                      " 'forward_headers': ['ACCEPT']}",
                      "routes[0].calls[0].forward_headers[0]: header \"ACCEPT\" is also set in \"headers\"");
}

static void
test_aggregate_groups_and_foreach(void)
{
    check_calls_error("{'name': 'a', 'backend': 'users', 'path': '/', 'group': 'g'}, "
                      "{'name': 'b', 'backend': 'users', 'path': '/', 'group': 'g'}",
                      "routes[0].calls[1].group: group \"g\" is already the group of call \"a\"");
    check_calls_error("{'name': 'a', 'backend': 'users', 'path': '/'}, "
                      "{'name': 'b', 'backend': 'users', 'path': '/', 'group': 'a'}",
                      "routes[0].calls[1].group: group \"a\" is already the group of call \"a\"");
    check_calls_error("{'name': 'a', 'backend': 'users', 'path': '/', 'group': 'b'}, "
                      "{'name': 'b', 'backend': 'users', 'path': '/'}",
                      "routes[0].calls[1].name: group \"b\" is already the group of call \"a\"");
    check_calls_error("{'name': 'a', 'backend': 'users', 'path': '/', 'group': '_errors'}",
                      "routes[0].calls[0].group: group \"_errors\" is reserved");
    check_calls_error("{'name': '_errors', 'backend': 'users', 'path': '/'}",
                      "routes[0].calls[0].name: group \"_errors\" is reserved for the error report: set another");
    check_calls_error("{'name': 'a', 'backend': 'users', 'path': '/', 'group': ''}",
                      "routes[0].calls[0].group: must be a non-empty string");

    check_calls_error("{'name': 'a', 'backend': 'users', 'path': '/', 'foreach': 'nope.items'}",
                      "routes[0].calls[0].foreach: unknown call \"nope\"");
    check_calls_error("{'name': 'a', 'backend': 'users', 'path': '/', 'foreach': 'a'}",
                      "routes[0].calls[0].foreach: a call cannot iterate over its own answer");
    check_calls_error("{'name': 'a', 'backend': 'users', 'path': '/'}, "
                      "{'name': 'b', 'backend': 'users', 'path': '/', 'foreach': 'a.'}",
                      "routes[0].calls[1].foreach: empty key after \".\"");
    check_calls_error("{'name': 'a', 'backend': 'users', 'path': '/'}, "
                      "{'name': 'b', 'backend': 'users', 'path': '/', 'foreach': 'a.x..y'}",
                      "routes[0].calls[1].foreach: ");
    check_calls_error("{'name': 'a', 'backend': 'users', 'path': '/', 'foreach': 5}",
                      "routes[0].calls[0].foreach: must name a call and the array in its answer");
    check_calls_error("{'name': 'a', 'backend': 'users', 'path': '/', 'foreach_concurrency': 2}",
                      "routes[0].calls[0].foreach_concurrency: only for a call with \"foreach\"");
    check_calls_error("{'name': 'a', 'backend': 'users', 'path': '/', 'foreach_max': 2}",
                      "routes[0].calls[0].foreach_max: only for a call with \"foreach\"");
    check_calls_error("{'name': 'a', 'backend': 'users', 'path': '/'}, "
                      "{'name': 'b', 'backend': 'users', 'path': '/', 'foreach': 'a', 'foreach_concurrency': 1025}",
                      "routes[0].calls[1].foreach_concurrency: must be between 1 and 1024");
    check_calls_error("{'name': 'a', 'backend': 'users', 'path': '/'}, "
                      "{'name': 'b', 'backend': 'users', 'path': '/', 'foreach': 'a', 'foreach_max': 10001}",
                      "routes[0].calls[1].foreach_max: must be between 1 and 10000");
}

static void
test_aggregate_shaping(void)
{
    check_calls_error("{'name': 'a', 'backend': 'users', 'path': '/', 'allow': ['id'], 'deny': ['x']}",
                      "routes[0].calls[0].deny: \"allow\" and \"deny\" cannot be used together");
    check_calls_error("{'name': 'a', 'backend': 'users', 'path': '/', 'allow': ['id', 'a..b']}",
                      "routes[0].calls[0].allow[1]: ");
    check_calls_error("{'name': 'a', 'backend': 'users', 'path': '/', 'deny': ['id', '']}",
                      "routes[0].calls[0].deny[1]: must be a non-empty JSON path");
    check_calls_error("{'name': 'a', 'backend': 'users', 'path': '/', 'deny': []}",
                      "routes[0].calls[0].deny: must be a non-empty array of JSON paths");
    check_calls_error("{'name': 'a', 'backend': 'users', 'path': '/', 'target': 'a[01]'}",
                      "routes[0].calls[0].target: ");
    check_calls_error("{'name': 'a', 'backend': 'users', 'path': '/', 'target': 1}",
                      "routes[0].calls[0].target: must be a JSON path");
    check_calls_error("{'name': 'a', 'backend': 'users', 'path': '/', 'rename': {'a': ''}}",
                      "routes[0].calls[0].rename.a: the new name must be a non-empty string");
    check_calls_error("{'name': 'a', 'backend': 'users', 'path': '/', 'rename': {'a': 'x', 'b': 'x'}}",
                      "routes[0].calls[0].rename.b: \"x\" is already the new name of \"a\"");
    check_calls_error("{'name': 'a', 'backend': 'users', 'path': '/', 'rename': ['a']}",
                      "routes[0].calls[0].rename: must be an object");
}

static void
test_aggregate_error_names_line(void)
{
    check_error(q(AGG "{'path': '/a/{id}', 'calls': [\n"
                      "  {'name': 'user', 'backend': 'users', 'path': '/users/{id}'},\n"
                      "  {'name': 'orders', 'backend': 'orders',\n"
                      "   'path': '/orders?u={usr.id}'}]}]}"),
                "t.json:6: routes[0].calls[1].path: unknown name \"usr\" in \"{usr.id}\"");
    check_error(q(AGG "{'path': '/a/{id}',\n 'calls': [\n"
                      "  {'name': 'a', 'backend': 'users', 'path': '/{b.id}'},\n"
                      "  {'name': 'b', 'backend': 'users', 'path': '/{a.id}'}]}]}"),
                "t.json:4: routes[0].calls: dependency cycle: a -> b -> a");
    check_error(q(AGG "{'path': '/a/{id}', 'calls': [\n"
                      "  {'name': 'a', 'backend': 'users', 'path': '/',\n"
                      "   'headers': {\n    'Via': 'x'}}]}]}"),
                "t.json:6: routes[0].calls[0].headers.Via: header \"Via\" is set by gatherd");
}

#define C_A "{'name': 'a', 'backend': 'users', 'path': '/', 'fallback': {}}, "

static void
test_aggregate_when(void)
{
    gw_config_t *cfg = parse(q(AGG "{'path': '/w/{id}', 'calls': [\n"
                                   " {'name': 'a', 'backend': 'users', 'path': '/'},\n"
                                   " {'name': 'b', 'backend': 'users', 'path': '/b', 'after': ['e'],\n"
                                   "  'when': {'all': [{'value': '{a.tier}', 'in': ['gold', 1, null]},\n"
                                   "    {'not': {'exists': '{query.x}'}}, {'any': [{'value': '{id}-{header.X}', "
                                   "'equals': 'x'}]}]},\n"
                                   "  'skip_value': {'s': [1]}},\n"
                                   " {'name': 'c', 'backend': 'users', 'path': '/c/{b.id}', 'skip_value': null},\n"
                                   " {'name': 'd', 'backend': 'users', 'path': '/{item.id}', 'foreach': 'a.list',\n"
                                   "  'when': {'value': '{item.kind}', 'equals': 'p'}, 'skip_value': 0},\n"
                                   " {'name': 'e', 'backend': 'users', 'path': '/e'}]}]}"));
    CHECK(cfg != NULL);
    if (cfg == NULL) {
        printf("    %s\n", err);
        return;
    }
    gw_call_t **c = cfg->routes[0]->agg.calls;
    CHECK(c[1]->when != NULL && !c[1]->when_item);
    CHECK(c[1]->deps == ((1u << 0) | (1u << 4)));   /* a (when) and e (after) */
    CHECK(c[1]->needs == (1u << 4));                /* a skipped "a" is only absent in b's condition */
    CHECK(c[1]->reads == (1u << 0));
    CHECK(json_is_object(c[1]->skip_value));
    CHECK(c[2]->when == NULL && json_is_null(c[2]->skip_value) && c[2]->needs == (1u << 1));
    CHECK(c[3]->when_item && json_integer_value(c[3]->skip_value) == 0);
    CHECK(cfg->routes[0]->agg.read & 1u);
    gw_config_unref(cfg);

    check_calls_error("{'name': 'a', 'backend': 'users', 'path': '/', 'when': {'value': '{query.x}', 'gt': 1}}",
                      "routes[0].calls[0].when.gt: unknown operator \"gt\"");
    check_calls_error("{'name': 'a', 'backend': 'users', 'path': '/', 'when': {'all': [{'exists': '{id}'}, "
                      "{'any': [{'exists': '{id}'}, {'nope': 1}]}]}}",
                      "routes[0].calls[0].when.all[1].any[1].nope: unknown operator \"nope\"");
    check_calls_error("{'name': 'a', 'backend': 'users', 'path': '/', "
                      "'when': {'value': '{query.x}', 'equals': 1, 'in': [1]}}",
                      "routes[0].calls[0].when.in: \"equals\" and \"in\" cannot be used together");
    check_calls_error("{'name': 'a', 'backend': 'users', 'path': '/', 'when': {'value': '{query.x}'}}",
                      "routes[0].calls[0].when.value: needs \"equals\" or \"in\"");
    check_calls_error("{'name': 'a', 'backend': 'users', 'path': '/', 'when': {'equals': 1}}",
                      "routes[0].calls[0].when.equals: needs \"value\"");
    check_calls_error("{'name': 'a', 'backend': 'users', 'path': '/', 'when': {'exists': '{id}', 'not': {}}}",
                      "routes[0].calls[0].when: one test per condition");
    check_calls_error("{'name': 'a', 'backend': 'users', 'path': '/', 'when': {}}",
                      "routes[0].calls[0].when: must be a condition");
    check_calls_error("{'name': 'a', 'backend': 'users', 'path': '/', 'when': ['x']}",
                      "routes[0].calls[0].when: must be a condition");
    check_calls_error("{'name': 'a', 'backend': 'users', 'path': '/', 'when': {'not': 1}}",
                      "routes[0].calls[0].when.not: must be a condition");
    check_calls_error("{'name': 'a', 'backend': 'users', 'path': '/', 'when': {'exists': 'gold'}}",
                      "routes[0].calls[0].when.exists: \"gold\" names no value (no placeholder)");
    check_calls_error("{'name': 'a', 'backend': 'users', 'path': '/', 'when': {'exists': 5}}",
                      "routes[0].calls[0].when.exists: must be a template naming a value");
    check_calls_error("{'name': 'a', 'backend': 'users', 'path': '/', 'when': {'exists': '{usr.id}'}}",
                      "routes[0].calls[0].when.exists: unknown name \"usr\" in \"{usr.id}\"");
    check_calls_error("{'name': 'a', 'backend': 'users', 'path': '/', 'when': {'exists': '{item.id}'}}",
                      "routes[0].calls[0].when.exists: \"{item.id}\": item exists only in a call with \"foreach\"");
    check_calls_error("{'name': 'a', 'backend': 'users', 'path': '/', 'when': {'exists': '{a.id}'}}",
                      "routes[0].calls[0].when: names the answer of call \"a\" itself");
    check_calls_error("{'name': 'a', 'backend': 'users', 'path': '/', 'when': {'value': '{id}', 'in': []}}",
                      "routes[0].calls[0].when.in: must be an array of 1 to 256 values");
    check_calls_error("{'name': 'a', 'backend': 'users', 'path': '/', 'when': {'value': '{id}', 'in': 'x'}}",
                      "routes[0].calls[0].when.in: must be an array of 1 to 256 values");
    check_calls_error("{'name': 'a', 'backend': 'users', 'path': '/', 'when': {'all': []}}",
                      "routes[0].calls[0].when.all: must be an array of 1 to 16 conditions");
    check_calls_error("{'name': 'a', 'backend': 'users', 'path': '/', 'when': {'any': {}}}",
                      "routes[0].calls[0].when.any: must be an array of 1 to 16 conditions");
    /* a cycle through a condition */
    check_calls_error("{'name': 'a', 'backend': 'users', 'path': '/', 'when': {'exists': '{b}'}}, "
                      "{'name': 'b', 'backend': 'users', 'path': '/{a.id}'}",
                      "routes[0].calls: dependency cycle: a -> b -> a");
    /* limits: 257 values, 17 conditions, 9 levels, 65 conditions */
    char text[12288], big[8192];
    size_t n = 0;
    n += (size_t)snprintf(big + n, sizeof(big) - n, "{'value': '{id}', 'in': [0");
    for (int i = 1; i <= 256; i++)
        n += (size_t)snprintf(big + n, sizeof(big) - n, ", %d", i);
    snprintf(big + n, sizeof(big) - n, "]}");
    snprintf(text, sizeof(text), "{'name': 'a', 'backend': 'users', 'path': '/', 'when': %s}", big);
    check_calls_error(text, "routes[0].calls[0].when.in: must be an array of 1 to 256 values");
    n = (size_t)snprintf(big, sizeof(big), "{'any': [{'exists': '{id}'}");
    for (int i = 1; i < 17; i++)
        n += (size_t)snprintf(big + n, sizeof(big) - n, ", {'exists': '{id}'}");
    snprintf(big + n, sizeof(big) - n, "]}");
    snprintf(text, sizeof(text), "{'name': 'a', 'backend': 'users', 'path': '/', 'when': %s}", big);
    check_calls_error(text, "routes[0].calls[0].when.any: must be an array of 1 to 16 conditions");
    n = 0;
    for (int i = 0; i < 8; i++)
        n += (size_t)snprintf(big + n, sizeof(big) - n, "{'not': ");
    n += (size_t)snprintf(big + n, sizeof(big) - n, "{'exists': '{id}'}");
    for (int i = 0; i < 8; i++)
        n += (size_t)snprintf(big + n, sizeof(big) - n, "}");
    snprintf(text, sizeof(text), "{'name': 'a', 'backend': 'users', 'path': '/', 'when': %s}", big);
    check_calls_error(text, "routes[0].calls[0].when.not.not.not.not.not.not.not.not: conditions nest at most 8 deep");
    /* 8 levels are fine */
    snprintf(text, sizeof(text), AGG "{'path': '/a/{id}', 'calls': [{'name': 'a', 'backend': 'users', 'path': '/', "
                                     "'when': %s}]}]}", big + strlen("{'not': "));
    text[strlen(text) - strlen("}]}]}") - 1] = ' '; /* one closing brace fewer */
    cfg = parse(q(text));
    CHECK(cfg != NULL);
    gw_config_unref(cfg);
    n = (size_t)snprintf(big, sizeof(big), "{'all': [");
    for (int i = 0; i < 5; i++) {
        n += (size_t)snprintf(big + n, sizeof(big) - n, "%s{'any': [{'exists': '{id}'}", i ? ", " : "");
        for (int k = 1; k < 13; k++)
            n += (size_t)snprintf(big + n, sizeof(big) - n, ", {'exists': '{id}'}");
        n += (size_t)snprintf(big + n, sizeof(big) - n, "]}");
    }
    snprintf(big + n, sizeof(big) - n, "]}");
    snprintf(text, sizeof(text), "{'name': 'a', 'backend': 'users', 'path': '/', 'when': %s}", big);
    check_calls_error(text, "at most 64 conditions in one \"when\"");

    /* skip_value only where a call can be skipped */
    check_calls_error("{'name': 'a', 'backend': 'users', 'path': '/', 'skip_value': 1}",
                      "routes[0].calls[0].skip_value: the call is never skipped");
    check_calls_error("{'name': 'a', 'backend': 'users', 'path': '/', 'when': {'exists': '{id}'}}, "
                      "{'name': 'b', 'backend': 'users', 'path': '/', 'when': {'exists': '{a}'}, 'skip_value': 1}, "
                      "{'name': 'c', 'backend': 'users', 'path': '/', 'after': ['b'], 'skip_value': 2}, "
                      "{'name': 'd', 'backend': 'users', 'path': '/', 'skip_value': 3}",
                      "routes[0].calls[3].skip_value: the call is never skipped: it has no \"when\"");
    check_error(q(AGG "{'path': '/a/{id}', 'calls': [\n"
                      "  {'name': 'a', 'backend': 'users', 'path': '/',\n"
                      "   'when': {'any': [\n     {'value': '{id}', 'like': 'x'}]}}]}]}"),
                "t.json:6: routes[0].calls[0].when.any[0].like: unknown operator \"like\"");
}

static void
test_aggregate_into(void)
{
    gw_config_t *cfg = parse(q(AGG "{'path': '/i', 'calls': [\n"
                                   " {'name': 'o', 'backend': 'users', 'path': '/', 'target': 'items'},\n"
                                   " {'name': 'p', 'backend': 'users', 'path': '/{item.id}', 'foreach': 'o.items',\n"
                                   "  'into': 'product', 'fallback': null},\n"
                                   " {'name': 's', 'backend': 'users', 'path': '/{item.id}', 'foreach': 'o.items',\n"
                                   "  'into': 'stock'},\n"
                                   " {'name': 'q', 'backend': 'users', 'path': '/{item.id}', 'foreach': 'o.other',\n"
                                   "  'into': 'product'},\n"
                                   " {'name': 'x', 'backend': 'users', 'path': '/', 'group': 'p'}]}]}"));
    CHECK(cfg != NULL);
    if (cfg == NULL) {
        printf("    %s\n", err);
        return;
    }
    CHECK_STR(cfg->routes[0]->agg.calls[1]->into, "product");
    CHECK(cfg->routes[0]->agg.enriched == 1u);
    gw_config_unref(cfg);
    check_calls_error("{'name': 'a', 'backend': 'users', 'path': '/', 'into': 'x'}",
                      "routes[0].calls[0].into: only for a call with \"foreach\"");
    check_calls_error(C_A "{'name': 'b', 'backend': 'users', 'path': '/', 'foreach': 'a', 'into': 'x.y'}",
                      "routes[0].calls[1].into: must be one key like \"product\"");
    check_calls_error(C_A "{'name': 'b', 'backend': 'users', 'path': '/', 'foreach': 'a', 'into': '[0]'}",
                      "routes[0].calls[1].into: must be one key");
    check_calls_error(C_A "{'name': 'b', 'backend': 'users', 'path': '/', 'foreach': 'a', 'into': ''}",
                      "routes[0].calls[1].into: must be one key");
    check_calls_error(C_A "{'name': 'b', 'backend': 'users', 'path': '/', 'foreach': 'a', 'into': 5}",
                      "routes[0].calls[1].into: must be one key");
    check_calls_error(C_A "{'name': 'b', 'backend': 'users', 'path': '/', 'foreach': 'a', 'into': 'x', 'group': 'g'}",
                      "routes[0].calls[1].group: \"group\" and \"into\" cannot be used together");
    check_calls_error(C_A "{'name': 'b', 'backend': 'users', 'path': '/', 'foreach': 'a.items', 'into': 'x'}, "
                      "{'name': 'c', 'backend': 'users', 'path': '/', 'foreach': 'a.items', 'into': 'x'}",
                      "routes[0].calls[2].into: call \"b\" already puts \"x\" into the elements of the same array");
    check_calls_error(C_A "{'name': 'c', 'backend': 'users', 'path': '/', 'foreach': 'b', 'into': 'x'}, "
                      "{'name': 'b', 'backend': 'users', 'path': '/', 'foreach': 'a'}",
                      "routes[0].calls[1].into: cannot put results into call \"b\": it is a foreach call");
}

static void
test_aggregate_batch(void)
{
    gw_config_t *cfg = parse(q(AGG "{'path': '/b', 'calls': [\n"
                                   " {'name': 'o', 'backend': 'users', 'path': '/'},\n"
                                   " {'name': 'p', 'backend': 'users', 'path': '/p?x=1',\n"
                                   "  'batch': {'from': 'o.items[*].product_id', 'param': 'ids', 'max': 2,\n"
                                   "            'separator': ';', 'match': 'data.id', 'into': 'product'}},\n"
                                   " {'name': 'q', 'backend': 'users', 'path': '/q',\n"
                                   "  'batch': {'from': 'o[*]', 'param': 'id'}}]}]}"));
    CHECK(cfg != NULL);
    if (cfg == NULL) {
        printf("    %s\n", err);
        return;
    }
    const gw_call_t *p = cfg->routes[0]->agg.calls[1], *qc = cfg->routes[0]->agg.calls[2];
    CHECK(p->batch != NULL && !p->foreach);
    CHECK_STR(p->into, "product");
    CHECK_STR(gw_jpath_text(p->foreach_path), "items");
    CHECK_STR(gw_jpath_text(p->batch->value), "product_id");
    CHECK_STR(p->batch->sep, ";");
    CHECK(p->batch->max == 2 && p->batch->concurrency == 8 && p->batch->max_items == 1000);
    CHECK(p->batch->max_url_bytes == 8192);
    CHECK(p->deps == 1u && (cfg->routes[0]->agg.read & 1u) && cfg->routes[0]->agg.enriched == 1u);
    CHECK(qc->into == NULL && qc->batch->max == 100);
    CHECK_STR(qc->batch->sep, ",");
    CHECK_STR(gw_jpath_text(qc->batch->match), "id");
    gw_config_unref(cfg);
#define BATCH(rest) C_A "{'name': 'b', 'backend': 'users', 'path': '/', 'batch': " rest "}"
    check_calls_error(BATCH("5"), "routes[0].calls[1].batch: must be an object");
    check_calls_error(BATCH("{'from': 'a[*].id', 'param': 'ids', 'size': 1}"),
                      "routes[0].calls[1].batch.size: unknown key \"size\" in \"batch\"");
    check_calls_error(BATCH("{'param': 'ids'}"), "routes[0].calls[1].batch.from: must name a call and the values");
    check_calls_error(BATCH("{'from': 'x[*].id', 'param': 'ids'}"), "routes[0].calls[1].batch.from: unknown call \"x\"");
    check_calls_error(BATCH("{'from': 'b[*].id', 'param': 'ids'}"),
                      "routes[0].calls[1].batch.from: a call cannot read its values from its own answer");
    check_calls_error(BATCH("{'from': 'a.items.id', 'param': 'ids'}"),
                      "routes[0].calls[1].batch.from: needs exactly one \"[*]\"");
    check_calls_error(BATCH("{'from': 'a[*].x[*]', 'param': 'ids'}"), "routes[0].calls[1].batch.from: needs exactly one");
    check_calls_error(BATCH("{'from': 'a[*', 'param': 'ids'}"), "routes[0].calls[1].batch.from: path");
    check_calls_error(BATCH("{'from': 'a[*].id'}"), "routes[0].calls[1].batch.param: must be the name of a query");
    check_calls_error(BATCH("{'from': 'a[*].id', 'param': 'a&b'}"), "routes[0].calls[1].batch.param: must be the name");
    check_calls_error(BATCH("{'from': 'a[*].id', 'param': 'ids', 'separator': '&'}"),
                      "routes[0].calls[1].batch.separator: must be 1-4 characters of");
    check_calls_error(BATCH("{'from': 'a[*].id', 'param': 'ids', 'separator': ''}"),
                      "routes[0].calls[1].batch.separator: must be");
    check_calls_error(BATCH("{'from': 'a[*].id', 'param': 'ids', 'match': 'a..b'}"),
                      "routes[0].calls[1].batch.match: must be a JSON path");
    check_calls_error(BATCH("{'from': 'a[*].id', 'param': 'ids', 'match': 'a[*]'}"),
                      "routes[0].calls[1].batch.match: must be a JSON path");
    check_calls_error(BATCH("{'from': 'a[*].id', 'param': 'ids', 'into': 'x.y'}"),
                      "routes[0].calls[1].batch.into: must be one key like \"product\"");
    check_calls_error(BATCH("{'from': 'a[*].id', 'param': 'ids', 'max': 0}"),
                      "routes[0].calls[1].batch.max: must be between 1 and 1000, not 0");
    check_calls_error(BATCH("{'from': 'a[*].id', 'param': 'ids', 'max': 1001}"),
                      "routes[0].calls[1].batch.max: must be between 1 and 1000");
    check_calls_error(BATCH("{'from': 'a[*].id', 'param': 'ids', 'concurrency': 65}"),
                      "routes[0].calls[1].batch.concurrency: must be between 1 and 64");
    check_calls_error(BATCH("{'from': 'a[*].id', 'param': 'ids', 'max_items': 10001}"),
                      "routes[0].calls[1].batch.max_items: must be between 1 and 10000");
    check_calls_error(BATCH("{'from': 'a[*].id', 'param': 'ids', 'max_url_bytes': 100}"),
                      "routes[0].calls[1].batch.max_url_bytes: must be between 256 and 65536");
    check_calls_error(C_A "{'name': 'b', 'backend': 'users', 'path': '/', 'foreach': 'a', "
                      "'batch': {'from': 'a[*].id', 'param': 'ids'}}",
                      "routes[0].calls[1].batch: \"batch\" and \"foreach\" cannot be used together");
    check_calls_error(C_A "{'name': 'b', 'backend': 'users', 'path': '/', 'into': 'x', "
                      "'batch': {'from': 'a[*].id', 'param': 'ids'}}",
                      "routes[0].calls[1].into: a batch call's \"into\" goes inside \"batch\"");
    check_calls_error(C_A "{'name': 'b', 'backend': 'users', 'path': '/{item.id}', "
                      "'batch': {'from': 'a[*].id', 'param': 'ids'}}",
                      "routes[0].calls[1].path: \"{item.id}\": item exists only in a call with \"foreach\"");
    check_calls_error(C_A "{'name': 'b', 'backend': 'users', 'path': '/', 'group': 'g', "
                      "'batch': {'from': 'a[*].id', 'param': 'ids', 'into': 'x'}}",
                      "routes[0].calls[1].group: \"group\" and \"into\" cannot be used together");
    check_calls_error(C_A "{'name': 'b', 'backend': 'users', 'path': '/', 'batch': {'from': 'a[*].id', 'param': 'i'}}, "
                      "{'name': 'c', 'backend': 'users', 'path': '/', 'batch': {'from': 'b[*].id', 'param': 'i', "
                      "'into': 'x'}}",
                      "routes[0].calls[2].batch.into: cannot put results into call \"b\": it is a batch call");
    check_calls_error(C_A "{'name': 'b', 'backend': 'users', 'path': '/', 'foreach': 'a.items', 'into': 'x'}, "
                      "{'name': 'c', 'backend': 'users', 'path': '/', 'batch': {'from': 'a.items[*].id', "
                      "'param': 'i', 'into': 'x'}}",
                      "routes[0].calls[2].batch.into: call \"b\" already puts \"x\" into the elements");
    check_calls_error(C_A "{'name': 'b', 'backend': 'users', 'path': '/', 'target': 'a[*]'}",
                      "routes[0].calls[1].target: path \"a[*]\": \"[*]\" selects several values: not allowed here");
    check_calls_error(C_A "{'name': 'b', 'backend': 'users', 'path': '/{a.items[*].id}'}",
                      "\"[*]\" selects several values: not allowed here");
#undef BATCH
}

static void
write_file(const char *path, const char *text)
{
    FILE *f = fopen(path, "w");
    CHECK(f != NULL);
    if (f) {
        fputs(text, f);
        fclose(f);
    }
}

static void
test_backend_host_names(void)
{
    gw_config_t *cfg = parse(B "{\"url\": \"http://users.internal:9101\", \"max_response_bytes\": 4096},\n"
                               "  \"tls\": {\"url\": \"https://API.Example.com.\"},\n"
                               "  \"under\": {\"url\": \"http://svc_1-a\"},\n"
                               "  \"ip\": {\"url\": \"http://10.0.0.1:81\"}}}");
    CHECK(cfg != NULL);
    if (cfg == NULL) {
        printf("    %s\n", err);
        return;
    }
    CHECK(cfg->nnamed == 3);
    const gw_backend_t *u = cfg->backends[0], *t = cfg->backends[1], *un = cfg->backends[2], *ip = cfg->backends[3];
    CHECK_STR(u->host_name, "users.internal");
    CHECK(u->port == 9101 && u->addrlen == 0);
    CHECK_STR(u->host_header, "users.internal:9101");
    CHECK(u->max_response_bytes == 4096);
    /* the URL host is the TLS name; SNI carries no final dot */
    CHECK_STR(t->host_name, "API.Example.com.");
    CHECK(t->port == 443 && t->tls && !t->tls_name_is_ip);
    CHECK_STR(t->tls_server_name, "API.Example.com");
    CHECK(t->max_response_bytes == 8u << 20);
    CHECK_STR(un->host_name, "svc_1-a");
    CHECK(un->port == 80);
    CHECK(ip->host_name == NULL && ip->port == 81 && ip->addrlen > 0);
    /* no resolver section: the defaults */
    CHECK(cfg->resolver.nnameservers == 0);
    CHECK(cfg->resolver.timeout_ms == 2000 && cfg->resolver.attempts == 2);
    CHECK(cfg->resolver.min_ttl_ms == 1000 && cfg->resolver.max_ttl_ms == 300000);
    CHECK_STR(cfg->resolver.hosts_file, "/etc/hosts");
    gw_config_unref(cfg);

    check_error(B "{\"url\": \"http://users..internal\"}}}", "backends.users.url: bad host name");
    check_error(B "{\"url\": \"http://users-.internal\"}}}", "bad host name");
    check_error(B "{\"url\": \"http://us$ers.internal\"}}}", "bad host name");
    check_error(B "{\"url\": \"http://users.123\"}}}", "bad host name");
    check_error(B "{\"url\": \"http://10.0.0.256\"}}}", "backends.users.url: bad IPv4 address");
    check_error(B "{\"url\": \"http://users.internal:0\"}}}", "backends.users.url: bad address");
    check_error(B "{\"url\": \"http://users.internal:x\"}}}", "backends.users.url: bad address");
    check_error(B "{\"url\": \"http://u@users.internal\"}}}", "credentials");
    check_error(B "{\"url\": \"http://" "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa" ".internal\"}}}",
                "bad host name");
    check_error(B "{\"url\": \"http://users.internal\", \"max_response_bytes\": 0}}}",
                "backends.users.max_response_bytes: must be between 1 and");
    check_error(B "{\"url\": \"http://users.internal\", \"max_response_bytes\": \"8M\"}}}",
                "backends.users.max_response_bytes: must be an integer");
}

static void
test_resolver(void)
{
    gw_config_t *cfg = parse("{\"listen\": [\"1\"],\n"
                             " \"resolver\": {\"nameservers\": [\"10.0.0.2\", \"10.0.0.3:5353\", \"[::1]:53\", \"::2\"],\n"
                             "   \"timeout_ms\": 500, \"attempts\": 3, \"min_ttl_ms\": 10, \"max_ttl_ms\": 60000,\n"
                             "   \"hosts_file\": false}}");
    CHECK(cfg != NULL);
    if (cfg == NULL) {
        printf("    %s\n", err);
        return;
    }
    const gw_resolver_conf_t *r = &cfg->resolver;
    CHECK(r->nnameservers == 4);
    CHECK(r->nameservers[0].addr.ss_family == AF_INET &&
          ntohs(((struct sockaddr_in *)&r->nameservers[0].addr)->sin_port) == 53);
    CHECK(ntohs(((struct sockaddr_in *)&r->nameservers[1].addr)->sin_port) == 5353);
    CHECK(r->nameservers[2].addr.ss_family == AF_INET6);
    CHECK(ntohs(((struct sockaddr_in6 *)&r->nameservers[3].addr)->sin6_port) == 53);
    CHECK(r->timeout_ms == 500 && r->attempts == 3 && r->min_ttl_ms == 10 && r->max_ttl_ms == 60000);
    CHECK(r->hosts_file == NULL);
    CHECK(cfg->nnamed == 0);
    gw_config_unref(cfg);

    cfg = parse("{\"listen\": [\"1\"], \"resolver\": {\"hosts_file\": \"/etc/hostname\"}}");
    CHECK(cfg != NULL && cfg->resolver.hosts_file && strcmp(cfg->resolver.hosts_file, "/etc/hostname") == 0);
    gw_config_unref(cfg);

#define R "{\"listen\": [\"1\"],\n \"resolver\": "
    check_error(R "{\"nameserver\": []}}", "t.json:2: resolver.nameserver: unknown key \"nameserver\" in \"resolver\"");
    check_error(R "{\"nameservers\": [\"ns1.example\"]}}", "t.json:2: resolver.nameservers[0]: bad nameserver address");
    check_error(R "{\"nameservers\": [\"10.0.0.1:99999\"]}}", "resolver.nameservers[0]: bad nameserver address");
    check_error(R "{\"nameservers\": [1]}}", "resolver.nameservers[0]: bad nameserver address");
    check_error(R "{\"nameservers\": []}}", "resolver.nameservers: must be an array of 1 to 16");
    check_error(R "{\"timeout_ms\": 5}}", "resolver.timeout_ms: must be between 10 and 60000");
    check_error(R "{\"attempts\": 11}}", "resolver.attempts: must be between 1 and 10");
    check_error(R "{\"min_ttl_ms\": 0}}", "resolver.min_ttl_ms: must be between 1 and");
    check_error(R "{\"min_ttl_ms\": 2000, \"max_ttl_ms\": 1000}}",
                "resolver.min_ttl_ms: min_ttl_ms (2000) must not be above max_ttl_ms (1000)");
    check_error(R "{\"max_ttl_ms\": 500}}", "resolver.max_ttl_ms: min_ttl_ms (1000) must not be above");
    check_error(R "{\"hosts_file\": \"/nonexistent/hosts\"}}", "resolver.hosts_file: cannot read \"/nonexistent/hosts\"");
    check_error(R "{\"hosts_file\": \"\"}}", "resolver.hosts_file: must be true, false or the path");
    check_error(R "[]}", "t.json:2: resolver: must be an object");
#undef R
}

static void
test_include(void)
{
    char dir[] = "/tmp/gw_test_conf_XXXXXX";
    CHECK(mkdtemp(dir) != NULL);
    char path[600], sub[512];
    snprintf(sub, sizeof(sub), "%s/conf.d", dir);
    mkdir(sub, 0700);
    snprintf(path, sizeof(path), "%s/a.json", sub);
    write_file(path, "{\"routes\": [{\"path\": \"/a\", \"respond\": {}}]}");
    snprintf(path, sizeof(path), "%s/b.json", sub);
    write_file(path, "{\"routes\": [{\"path\": \"/b\", \"respond\": {}}]}");
    snprintf(path, sizeof(path), "%s/main.json", dir);
    write_file(path, "{\"listen\": [\"1\"], \"include\": [\"conf.d/*.json\", \"conf.d/none-*.json\"],\n"
                     " \"routes\": [{\"path\": \"/m\", \"respond\": {}}]}");
    gw_config_t *cfg = gw_config_load(path, 0, err, sizeof(err));
    CHECK(cfg != NULL && cfg->nroutes == 3);
    if (cfg == NULL)
        printf("    %s\n", err);
    gw_config_unref(cfg);

    /* an error in an included file names that file and its line */
    snprintf(path, sizeof(path), "%s/c.json", sub);
    write_file(path, "{\"routes\": [\n{\"path\": \"/c\",\n \"respond\": {\"status\": \"x\"}}]}");
    snprintf(path, sizeof(path), "%s/main.json", dir);
    cfg = gw_config_load(path, 0, err, sizeof(err));
    CHECK(cfg == NULL);
    CHECK_CONTAINS(err, "conf.d/c.json:3: routes[0].respond.status: must be an integer");
    gw_config_unref(cfg);

    /* a duplicate across files names the first definition */
    snprintf(path, sizeof(path), "%s/c.json", sub);
    write_file(path, "{\"routes\": [{\"path\": \"/m\", \"respond\": {}}]}");
    snprintf(path, sizeof(path), "%s/main.json", dir);
    cfg = gw_config_load(path, 0, err, sizeof(err));
    CHECK(cfg == NULL);
    CHECK_CONTAINS(err, "duplicate route");
    CHECK_CONTAINS(err, "main.json: routes[0]");
    gw_config_unref(cfg);

    /* included files hold routes only; a missing literal file is an error */
    snprintf(path, sizeof(path), "%s/c.json", sub);
    write_file(path, "{\"listen\": [\"2\"]}");
    snprintf(path, sizeof(path), "%s/main.json", dir);
    cfg = gw_config_load(path, 0, err, sizeof(err));
    CHECK(cfg == NULL);
    CHECK_CONTAINS(err, "unknown key \"listen\" in an included file");
    unlink(path);
    write_file(path, "{\"listen\": [\"1\"], \"include\": [\"missing.json\"]}");
    cfg = gw_config_load(path, 0, err, sizeof(err));
    CHECK(cfg == NULL);
    CHECK_CONTAINS(err, "include[0]: included file");
    CHECK_CONTAINS(err, "does not exist");

    /* a pattern in a folder that does not exist matches nothing (a fresh
     * install without conf.d/), a literal file there is still an error */
    write_file(path, "{\"listen\": [\"1\"], \"include\": [\"nodir/*.json\"]}");
    cfg = gw_config_load(path, 0, err, sizeof(err));
    CHECK(cfg != NULL && cfg->nroutes == 0);
    gw_config_unref(cfg);
    write_file(path, "{\"listen\": [\"1\"], \"include\": [\"nodir/a.json\"]}");
    cfg = gw_config_load(path, 0, err, sizeof(err));
    CHECK(cfg == NULL);
    CHECK_CONTAINS(err, "does not exist");

    char cmd[700];
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
    CHECK(system(cmd) == 0);
}

/* --- retries and hedging ------------------------------------------------- */

#define RB "{'listen': ['1'], 'backends': {'users': {'url': 'http://127.0.0.1:9101', 'timeout_ms': 700, 'retry': "

/* A backend "users" with this retry section (single-quoted JSON) must be
 * rejected with a message containing expect. */
static void
check_retry_error(const char *retry, const char *expect)
{
    char text[4096];
    snprintf(text, sizeof(text), RB "%s}}}", retry);
    check_error(q(text), expect);
}

static void
test_retry(void)
{
    /* absent: no retries, defaults for the budget hedges use */
    gw_config_t *cfg = parse(q(AGG "{'path': '/a', 'calls': [{'name': 'a', 'backend': 'users', 'path': '/'}]}]}"));
    CHECK(cfg != NULL);
    if (cfg == NULL)
        return;
    const gw_retry_conf_t *rc = cfg->backends[0]->retry;
    CHECK(rc != NULL && !rc->enabled && rc->attempts == 1 && !rc->counted);
    CHECK(rc->budget_percent == 20 && rc->min_retries == 3 && rc->nstatuses == 3);
    CHECK(cfg->routes[0]->agg.calls[0]->hedge_after_ms == 0);
    gw_config_unref(cfg);

    /* present and empty: the documented defaults */
    char text[4096];
    snprintf(text, sizeof(text), RB "{}}}}");
    cfg = parse(q(text));
    CHECK(cfg != NULL);
    if (cfg == NULL) {
        printf("    %s\n", err);
        return;
    }
    rc = cfg->backends[0]->retry;
    CHECK(rc->enabled && rc->counted && rc->attempts == 3 && rc->backoff_base_ms == 25 && rc->backoff_cap_ms == 250);
    CHECK(rc->per_try_timeout_ms == 0 && !rc->retry_non_idempotent && rc->budget_percent == 20 && rc->min_retries == 3);
    CHECK(rc->nstatuses == 3 && gw_retry_status(rc, 502) && gw_retry_status(rc, 503) && gw_retry_status(rc, 504));
    CHECK(!gw_retry_status(rc, 500));
    CHECK(gw_retry_method_ok(rc, HTTP_GET) && gw_retry_method_ok(rc, HTTP_PUT) && !gw_retry_method_ok(rc, HTTP_POST));
    /* full jitter within [0, min(cap, base * 2^(n-1))] */
    for (int i = 0; i < 2000; i++) {
        int b1 = gw_retry_backoff_ms(rc, 1), b4 = gw_retry_backoff_ms(rc, 4), b9 = gw_retry_backoff_ms(rc, 9);
        CHECK(b1 >= 0 && b1 <= 25 && b4 >= 0 && b4 <= 200 && b9 >= 0 && b9 <= 250);
    }
    /* the budget: max(min_retries, budget_percent of requests in flight) */
    for (int i = 0; i < 30; i++)
        gw_retry_request_begin(rc);
    int granted = 0;
    for (int i = 0; i < 10; i++)
        granted += gw_retry_acquire(rc);
    CHECK(granted == 6); /* 20 % of 30 */
    for (int i = 0; i < 30; i++)
        gw_retry_request_end(rc);
    CHECK(!gw_retry_acquire(rc)); /* 6 in flight, min_retries 3 */
    for (int i = 0; i < 6; i++)
        gw_retry_release(rc);
    granted = 0;
    for (int i = 0; i < 5; i++)
        granted += gw_retry_acquire(rc);
    CHECK(granted == 3);
    gw_retry_stats_t st;
    gw_retry_stats(rc, &st);
    CHECK(st.retries == 3 && st.requests == 0 && st.granted == 9 && st.denied == 7);
    for (int i = 0; i < 3; i++)
        gw_retry_release(rc);

    /* a reload shares the state of a same-named backend with the same settings */
    gw_config_t *same = parse(q(text));
    snprintf(text, sizeof(text), RB "{'attempts': 2}}}}");
    gw_config_t *other = parse(q(text));
    CHECK(same != NULL && other != NULL);
    if (same && other) {
        gw_retry_inherit(same, cfg);
        gw_retry_inherit(other, cfg);
        CHECK(same->backends[0]->retry->state == cfg->backends[0]->retry->state);
        CHECK(other->backends[0]->retry->state != cfg->backends[0]->retry->state);
        gw_config_unref(cfg); /* the shared state lives on in same */
        cfg = NULL;
        gw_retry_request_begin(same->backends[0]->retry);
        gw_retry_request_end(same->backends[0]->retry);
    }
    gw_config_unref(same);
    gw_config_unref(other);
    gw_config_unref(cfg);

    snprintf(text, sizeof(text),
             RB "{'attempts': 5, 'backoff_base_ms': 0, 'backoff_cap_ms': 0, 'per_try_timeout_ms': 100, "
                "'statuses': [429, 503], 'retry_non_idempotent': true, 'budget_percent': 0, 'min_retries': 0}}}}");
    cfg = parse(q(text));
    CHECK(cfg != NULL);
    if (cfg) {
        rc = cfg->backends[0]->retry;
        CHECK(rc->attempts == 5 && rc->backoff_cap_ms == 0 && rc->per_try_timeout_ms == 100 && rc->nstatuses == 2);
        CHECK(gw_retry_status(rc, 429) && !gw_retry_status(rc, 502) && gw_retry_method_ok(rc, HTTP_POST));
        CHECK(gw_retry_backoff_ms(rc, 3) == 0);
        CHECK(!gw_retry_acquire(rc)); /* budget 0 and min_retries 0: never */
    }
    gw_config_unref(cfg);

    check_retry_error("3", "t.json:1: backends.users.retry: must be an object");
    check_retry_error("{'atempts': 2}", "backends.users.retry.atempts: unknown key \"atempts\" in \"retry\"");
    check_retry_error("{'attempts': 0}", "backends.users.retry.attempts: must be between 1 and 10");
    check_retry_error("{'attempts': 11}", "backends.users.retry.attempts: must be between 1 and 10");
    check_retry_error("{'backoff_base_ms': -1}", "backends.users.retry.backoff_base_ms: must be between 0 and 60000");
    check_retry_error("{'backoff_base_ms': 100, 'backoff_cap_ms': 50}",
                      "backends.users.retry.backoff_cap_ms: must not be below backoff_base_ms (100)");
    check_retry_error("{'per_try_timeout_ms': 'x'}", "backends.users.retry.per_try_timeout_ms: must be an integer");
    check_retry_error("{'statuses': 503}", "backends.users.retry.statuses: must be an array");
    check_retry_error("{'statuses': [503, 200]}", "backends.users.retry.statuses[1]: must be a status between 400 and 599");
    check_retry_error("{'statuses': [503, 503]}", "backends.users.retry.statuses[1]: status 503 is listed twice");
    check_retry_error("{'retry_non_idempotent': 1}", "backends.users.retry.retry_non_idempotent: must be true or false");
    check_retry_error("{'budget_percent': 101}", "backends.users.retry.budget_percent: must be between 0 and 100");
    check_retry_error("{'min_retries': -1}", "backends.users.retry.min_retries: must be between 0 and 100000");
    /* the line of the error */
    check_error(q("{'listen': ['1'], 'backends': {'users': {'url': 'http://127.0.0.1:9101',\n"
                  " 'retry': {\n 'attempts': 99}}}}"),
                "t.json:3: backends.users.retry.attempts: must be between 1 and 10");

    /* hedge_after_ms */
    cfg = parse(q(AGG "{'path': '/a', 'calls': [{'name': 'a', 'backend': 'users', 'path': '/', "
                      "'hedge_after_ms': 50}]}]}"));
    CHECK(cfg != NULL);
    if (cfg) {
        CHECK(cfg->routes[0]->agg.calls[0]->hedge_after_ms == 50);
        CHECK(cfg->backends[0]->retry->counted && !cfg->backends[0]->retry->enabled);
        CHECK(!cfg->backends[1]->retry->counted);
    }
    gw_config_unref(cfg);
    check_calls_error("{'name': 'a', 'backend': 'users', 'path': '/', 'method': 'POST', 'hedge_after_ms': 50}",
                      "routes[0].calls[0].hedge_after_ms: needs an idempotent method (GET, HEAD, PUT, DELETE, "
                      "OPTIONS), not POST");
    check_calls_error("{'name': 'a', 'backend': 'users', 'path': '/', 'hedge_after_ms': 700}",
                      "routes[0].calls[0].hedge_after_ms: must be below the call's timeout_ms (700)");
    check_calls_error("{'name': 'a', 'backend': 'users', 'path': '/', 'hedge_after_ms': 0}",
                      "routes[0].calls[0].hedge_after_ms: must be between 1 and");
}

static void
test_missing_file(void)
{
    gw_config_t *cfg = gw_config_load("/nonexistent/gatherd.json", 0, err, sizeof(err));
    CHECK(cfg == NULL);
    CHECK_CONTAINS(err, "/nonexistent/gatherd.json: cannot open: No such file or directory");
}

static void
test_trusted_proxies_and_max_inflight(void)
{
    gw_config_t *cfg = parse("{\"listen\": \"1\"}");
    CHECK(cfg != NULL && cfg->ntrusted == 0 && cfg->real_ip_header == GW_REALIP_X_FORWARDED_FOR &&
          cfg->max_inflight == 0);
    gw_config_unref(cfg);
    cfg = parse("{\"listen\": \"1\", \"max_inflight\": 5, \"real_ip_header\": \"x-real-ip\",\n"
                " \"trusted_proxies\": [\"127.0.0.1/32\", \"10.0.0.0/8\", \"::1/128\", \"192.0.2.7\",\n"
                "   \"::ffff:172.16.0.0/108\", \"0.0.0.0/0\"]}");
    CHECK(cfg != NULL);
    if (cfg == NULL) {
        printf("    %s\n", err);
        return;
    }
    CHECK(cfg->max_inflight == 5 && cfg->real_ip_header == GW_REALIP_X_REAL_IP && cfg->ntrusted == 6);
    CHECK(cfg->trusted_proxies[1].family == AF_INET && cfg->trusted_proxies[1].bits == 8);
    CHECK(cfg->trusted_proxies[2].family == AF_INET6 && cfg->trusted_proxies[2].bits == 128);
    CHECK(cfg->trusted_proxies[3].bits == 32);
    CHECK(cfg->trusted_proxies[4].family == AF_INET && cfg->trusted_proxies[4].bits == 12);
    gw_config_unref(cfg);
    check_error("{\"listen\": \"1\",\n \"max_inflight\": 0}", "t.json:2: max_inflight: must be between 1 and 10000000");
    check_error("{\"listen\": \"1\", \"max_inflight\": \"9\"}", "max_inflight: must be an integer");
    check_error("{\"listen\": \"1\", \"trusted_proxies\": \"10.0.0.0/8\"}", "trusted_proxies: must be an array");
    check_error("{\"listen\": \"1\",\n \"trusted_proxies\": [\"10.0.0.0/8\",\n \"10.0.0.1/8\"]}",
                "t.json:3: trusted_proxies[1]: \"10.0.0.1/8\": the address has bits set beyond the /8 prefix");
    check_error("{\"listen\": \"1\", \"trusted_proxies\": [\"10.0.0.0/33\"]}", "trusted_proxies[0]: \"10.0.0.0/33\": the prefix length is at most 32");
    check_error("{\"listen\": \"1\", \"trusted_proxies\": [\"::/129\"]}", "at most 128");
    check_error("{\"listen\": \"1\", \"trusted_proxies\": [\"10.0.0.0/\"]}", "must be a number");
    check_error("{\"listen\": \"1\", \"trusted_proxies\": [\"proxy.internal\"]}", "is not an address block");
    check_error("{\"listen\": \"1\", \"trusted_proxies\": [\"10.0.0.0/8 \"]}", "must be a number");
    check_error("{\"listen\": \"1\", \"trusted_proxies\": [8]}", "trusted_proxies[0]: must be a string");
    check_error("{\"listen\": \"1\",\n \"real_ip_header\": \"Forwarded\"}",
                "t.json:2: real_ip_header: must be \"X-Forwarded-For\" or \"X-Real-IP\"");
}

static void
test_rate_limit(void)
{
    gw_config_t *cfg = parse("{\"listen\": \"1\", \"routes\": [\n"
                             " {\"path\": \"/a\", \"respond\": {}, \"rate_limit\": {\"rate\": 20}},\n"
                             " {\"path\": \"/b\", \"respond\": {}, \"rate_limit\": {\"rate\": 3, \"period_ms\": 60000,\n"
                             "   \"burst\": 7, \"key\": \"header:X-Api-Key\", \"max_keys\": 50}},\n"
                             " {\"path\": \"/c\", \"respond\": {}, \"rate_limit\": {\"rate\": 1, \"key\": \"client\"}},\n"
                             " {\"path\": \"/d\", \"respond\": {}}]}");
    CHECK(cfg != NULL);
    if (cfg == NULL) {
        printf("    %s\n", err);
        return;
    }
    const gw_ratelimit_conf_t *a = gw_ratelimit_conf(cfg->routes[0]->ratelimit);
    CHECK(a->rate == 20 && a->period_ms == 1000 && a->burst == 20 && a->key == GW_RL_KEY_GLOBAL && a->max_keys == 10000);
    const gw_ratelimit_conf_t *b = gw_ratelimit_conf(cfg->routes[1]->ratelimit);
    CHECK(b->rate == 3 && b->period_ms == 60000 && b->burst == 7 && b->key == GW_RL_KEY_HEADER && b->max_keys == 50);
    CHECK_STR(b->header, "X-Api-Key");
    CHECK(gw_ratelimit_conf(cfg->routes[2]->ratelimit)->key == GW_RL_KEY_CLIENT);
    CHECK(cfg->routes[3]->ratelimit == NULL);
    gw_config_unref(cfg);
    const char *pre = "{\"listen\": \"1\", \"routes\": [{\"path\": \"/a\", \"respond\": {},\n \"rate_limit\": ";
    static const struct {
        const char *rl, *expect;
    } bad[] = {
        { "{}}]}", "t.json:2: routes[0].rate_limit: \"rate\" is required" },
        { "5}]}", "routes[0].rate_limit: must be an object" },
        { "{\"rate\": 0}}]}", "routes[0].rate_limit.rate: must be between 1 and 10000000, not 0" },
        { "{\"rate\": 10, \"burst\": 0}}]}", "rate_limit.burst: must be between 1 and 10000000" },
        { "{\"rate\": 10, \"period_ms\": 0}}]}", "rate_limit.period_ms: must be between 1 and 86400000" },
        { "{\"rate\": 10000000, \"period_ms\": 100}}]}", "rate_limit.rate: at most 10000000 per second" },
        { "{\"rate\": 1, \"key\": \"ip\"}}]}", "rate_limit.key: must be \"global\", \"client\" or \"header:NAME\"" },
        { "{\"rate\": 1, \"key\": \"header:\"}}]}", "rate_limit.key: must be" },
        { "{\"rate\": 1, \"key\": \"header:a b\"}}]}", "rate_limit.key: must be" },
        { "{\"rate\": 1, \"max_keys\": 5}}]}", "rate_limit.max_keys: only for a keyed limit" },
        { "{\"rate\": 1, \"key\": \"client\", \"max_keys\": 0}}]}", "rate_limit.max_keys: must be between 1 and 1000000" },
        { "{\"rate\": 1,\n \"burts\": 5}}]}", "t.json:3: routes[0].rate_limit.burts: unknown key \"burts\" in \"rate_limit\"" },
    };
    for (size_t i = 0; i < GW_NELEM(bad); i++) {
        char text[512];
        snprintf(text, sizeof(text), "%s%s", pre, bad[i].rl);
        check_error(text, bad[i].expect);
    }
    /* the limit of a proxy or an aggregate route too */
    cfg = parse("{\"listen\": \"1\", \"backends\": {\"b\": {\"url\": \"http://127.0.0.1:1\"}}, \"routes\": [\n"
                " {\"path\": \"/p/*\", \"proxy\": {\"backend\": \"b\"}, \"rate_limit\": {\"rate\": 2}},\n"
                " {\"path\": \"/g\", \"calls\": [{\"name\": \"x\", \"backend\": \"b\", \"path\": \"/\"}],\n"
                "  \"rate_limit\": {\"rate\": 2, \"key\": \"client\"}}]}");
    CHECK(cfg != NULL && cfg->routes[0]->ratelimit != NULL && cfg->routes[1]->ratelimit != NULL);
    gw_config_unref(cfg);
}

static void
test_rate_limit_inherit(void)
{
    const char *text = "{\"listen\": \"1\", \"routes\": [\n"
                       " {\"path\": \"/a\", \"respond\": {}, \"rate_limit\": {\"rate\": 2}},\n"
                       " {\"path\": \"/b\", \"respond\": {}, \"rate_limit\": {\"rate\": 2}},\n"
                       " {\"path\": \"/c\", \"methods\": [\"GET\"], \"respond\": {}, \"rate_limit\": {\"rate\": 2}}]}";
    const char *text2 = "{\"listen\": \"1\", \"routes\": [\n"
                        " {\"path\": \"/a\", \"respond\": {\"status\": 201}, \"rate_limit\": {\"rate\": 2}},\n"
                        " {\"path\": \"/b\", \"respond\": {}, \"rate_limit\": {\"rate\": 3}},\n"
                        " {\"path\": \"/c\", \"methods\": [\"POST\"], \"respond\": {}, \"rate_limit\": {\"rate\": 2}}]}";
    gw_config_t *oldc = parse(text), *newc = parse(text2);
    CHECK(oldc != NULL && newc != NULL);
    if (oldc == NULL || newc == NULL)
        return;
    gw_ratelimit_inherit(newc, oldc);
    CHECK(newc->routes[0]->ratelimit == oldc->routes[0]->ratelimit); /* same pattern, methods, settings */
    CHECK(newc->routes[1]->ratelimit != oldc->routes[1]->ratelimit); /* another rate */
    CHECK(newc->routes[2]->ratelimit != oldc->routes[2]->ratelimit); /* other methods */
    gw_config_unref(oldc); /* the shared limiter lives on with newc */
    gw_ratelimit_result_t res;
    gw_ratelimit_take(newc->routes[0]->ratelimit, "", 0, 0, &res);
    CHECK(res.admitted);
    gw_config_unref(newc);
}

static void
test_shipped_configs_are_valid(void)
{
    const char *src = getenv("GW_SRCDIR");
    char path[1024];
    snprintf(path, sizeof(path), "%s/conf/gatherd.json", src ? src : ".");
    gw_config_t *cfg = gw_config_load(path, 0, err, sizeof(err));
    if (cfg == NULL)
        printf("    %s\n", err);
    CHECK(cfg != NULL);
    gw_config_unref(cfg);
}

/* "circuit_breaker", "max_pending", "queue_timeout_ms" of a backend, and
 * gw_breaker_inherit() at a reload. */
static void
test_backend_resilience(void)
{
    gw_config_t *cfg = parse(B "{\"url\": \"http://127.0.0.1:1\"}}}");
    CHECK(cfg != NULL);
    if (cfg == NULL)
        return;
    CHECK(cfg->backends[0]->max_pending == 128 && cfg->backends[0]->queue_timeout_ms == 1000);
    CHECK(cfg->backends[0]->breaker == NULL);
    gw_config_unref(cfg);

    cfg = parse(B "{\"url\": \"http://127.0.0.1:1\", \"max_pending\": 0, \"queue_timeout_ms\": 50,\n"
                  " \"circuit_breaker\": {}}}}");
    CHECK(cfg != NULL);
    if (cfg == NULL)
        return;
    const gw_backend_t *b = cfg->backends[0];
    CHECK(b->max_pending == 0 && b->queue_timeout_ms == 50);
    CHECK(b->breaker != NULL);
    CHECK(b->breaker_conf.consecutive_failures == 5 && b->breaker_conf.failure_ratio == 0.5);
    CHECK(b->breaker_conf.window_ms == 10000 && b->breaker_conf.min_requests == 20);
    CHECK(b->breaker_conf.open_ms == 5000 && b->breaker_conf.max_open_ms == 60000 && b->breaker_conf.probe_requests == 1);
    gw_breaker_stats_t st;
    CHECK(gw_breaker_stats(b, &st) && st.state == GW_BREAKER_CLOSED && st.trips == 0);
    gw_config_unref(cfg);

#define CB(x) B "{\"url\": \"http://127.0.0.1:1\", \"circuit_breaker\": " x "}}}"
    cfg = parse(CB("{\"consecutive_failures\": 0, \"failure_ratio\": 1, \"window_ms\": 100, \"min_requests\": 1,"
                   " \"open_ms\": 10, \"max_open_ms\": 10, \"probe_requests\": 3}"));
    CHECK(cfg != NULL && cfg->backends[0]->breaker_conf.consecutive_failures == 0 &&
          cfg->backends[0]->breaker_conf.failure_ratio == 1.0 && cfg->backends[0]->breaker_conf.probe_requests == 3);
    gw_config_unref(cfg);
    check_error(CB("{\"consecutive_failures\": 0, \"failure_ratio\": 0}"), "backends.users.circuit_breaker: consecutive_failures and failure_ratio are both 0");
    check_error(CB("{\"failure_ratio\": 1.5}"), "backends.users.circuit_breaker.failure_ratio: must be a number from 0 to 1");
    check_error(CB("{\"failure_ratio\": \"half\"}"), "circuit_breaker.failure_ratio: must be a number");
    check_error(CB("{\"open_ms\": 5000, \"max_open_ms\": 1000}"), "circuit_breaker.max_open_ms: must not be below open_ms (5000)");
    check_error(CB("{\"window_ms\": 10}"), "circuit_breaker.window_ms: must be between 100 and");
    check_error(CB("{\"probe_requests\": 0}"), "circuit_breaker.probe_requests: must be between 1 and");
    check_error(CB("{\"min_requests\": 0}"), "circuit_breaker.min_requests: must be between 1 and");
    check_error(CB("{\"open_ms\": 0}"), "circuit_breaker.open_ms: must be between 1 and");
    check_error(CB("{\"consecutive_failures\": -1}"), "circuit_breaker.consecutive_failures: must be between 0 and");
    check_error(CB("{\"half_open\": 1}"), "t.json:1: backends.users.circuit_breaker.half_open: unknown key");
    check_error(CB("true"), "backends.users.circuit_breaker: must be an object");
    check_error(B "{\"url\": \"http://127.0.0.1:1\",\n \"max_pending\": -1}}}", "t.json:2: backends.users.max_pending: must be between 0 and 100000");
    check_error(B "{\"url\": \"http://127.0.0.1:1\", \"queue_timeout_ms\": 0}}}", "backends.users.queue_timeout_ms: must be between 1 and");

    /* a reload keeps the state of an unchanged breaker, and only that */
    const char *two = "{\"listen\": [\"1\"], \"backends\": {\"a\": {\"url\": \"http://127.0.0.1:1\", \"circuit_breaker\": {\"open_ms\": %d}},"
                      " \"b\": {\"url\": \"http://127.0.0.1:2\", \"circuit_breaker\": {}}, \"c\": {\"url\": \"http://127.0.0.1:3\"}}}";
    char t1[512], t2[512];
    snprintf(t1, sizeof(t1), two, 5000);
    snprintf(t2, sizeof(t2), two, 6000);
    gw_config_t *oldc = parse(t1);
    gw_config_t *same = parse(t1);
    gw_config_t *changed = parse(t2);
    CHECK(oldc && same && changed);
    if (oldc && same && changed) {
        gw_breaker_inherit(same, oldc);
        CHECK(same->backends[0]->breaker == oldc->backends[0]->breaker);
        CHECK(same->backends[1]->breaker == oldc->backends[1]->breaker);
        CHECK(same->backends[2]->breaker == NULL);
        gw_breaker_inherit(changed, oldc);
        CHECK(changed->backends[0]->breaker != oldc->backends[0]->breaker); /* open_ms changed: fresh */
        CHECK(changed->backends[1]->breaker == oldc->backends[1]->breaker);
        /* opened in the old configuration: open in the new one too */
        for (int k = 0; k < 5; k++) {
            CHECK(gw_breaker_admit(oldc->backends[1], NULL) == GW_OK);
            gw_breaker_done(oldc->backends[1], false);
        }
        int ra = 0;
        CHECK(gw_breaker_admit(same->backends[1], &ra) == GW_AGAIN && ra > 4000 && ra <= 5000);
        CHECK(gw_breaker_retry_after_s(same->backends[1]) == 5);
    }
    gw_config_unref(oldc); /* the shared state outlives the old configuration */
    if (same) {
        gw_breaker_stats_t st2;
        CHECK(gw_breaker_stats(same->backends[1], &st2) && st2.state == GW_BREAKER_OPEN && st2.trips == 1);
    }
    gw_config_unref(same);
    gw_config_unref(changed);
#undef CB
}

/* "log": defaults, every key, and the errors. */
static void
test_log(void)
{
    gw_config_t *cfg = parse("{\"listen\": \"127.0.0.1:1\"}");
    CHECK(cfg && cfg->log.level == GW_LOG_NOTICE && cfg->log.error_path == NULL && !cfg->log.access_on &&
          cfg->log.access_path == NULL && cfg->log.access_format == GW_ALOG_COMBINED);
    gw_config_unref(cfg);
    cfg = parse("{\"listen\": \"127.0.0.1:1\", \"log\": {\"level\": \"debug\", \"error_log\": \"/var/log/e.log\",\n"
                " \"access_log\": \"/var/log/a.log\", \"access_format\": \"json\"}}");
    CHECK(cfg != NULL);
    if (cfg) {
        CHECK(cfg->log.level == GW_LOG_DEBUG && cfg->log.access_on && cfg->log.access_format == GW_ALOG_JSON);
        CHECK_STR(cfg->log.error_path, "/var/log/e.log");
        CHECK_STR(cfg->log.access_path, "/var/log/a.log");
    }
    gw_config_unref(cfg);
    cfg = parse("{\"listen\": \"127.0.0.1:1\", \"log\": {\"error_log\": \"stderr\", \"access_log\": \"stderr\"}}");
    CHECK(cfg && cfg->log.error_path == NULL && cfg->log.access_on && cfg->log.access_path == NULL);
    gw_config_unref(cfg);
    cfg = parse("{\"listen\": \"127.0.0.1:1\", \"log\": {\"access_log\": \"off\"}}");
    CHECK(cfg && !cfg->log.access_on && cfg->log.access_path == NULL);
    gw_config_unref(cfg);
    check_error("{\"listen\": \"127.0.0.1:1\",\n \"log\": {\"acces_log\": \"x\"}}",
                "t.json:2: log.acces_log: unknown key \"acces_log\" in \"log\"");
    check_error("{\"listen\": \"127.0.0.1:1\", \"log\": {\"level\": \"loud\"}}", "log.level: must be");
    check_error("{\"listen\": \"127.0.0.1:1\", \"log\": {\"access_format\": \"xml\"}}", "log.access_format: must be");
    check_error("{\"listen\": \"127.0.0.1:1\", \"log\": {\"error_log\": \"off\"}}", "log.error_log: must be");
    check_error("{\"listen\": \"127.0.0.1:1\", \"log\": {\"access_log\": 1}}", "log.access_log: must be");
    check_error("{\"listen\": \"127.0.0.1:1\", \"log\": {\"access_log\": \"\"}}", "log.access_log: must be");
    check_error("{\"listen\": \"127.0.0.1:1\", \"log\": \"on\"}", "log: must be an object");
}

/* "servers", "balance", "hash_key", "health_check", "outlier_detection". */
#define US "{\"listen\": \"127.0.0.1:1\", \"backends\": {\"users\": "
static void
test_servers(void)
{
    gw_config_t *cfg = parse(US "{\"servers\": [\"http://10.0.0.1:8080\", {\"url\": \"http://10.0.0.2:8080\", "
                             "\"weight\": 3}, {\"url\": \"http://api.internal\", \"backup\": true}], "
                             "\"tls\": null}}}");
    CHECK(cfg == NULL); /* tls needs https */
    cfg = parse(US "{\"servers\": [\"http://10.0.0.1:8080\", {\"url\": \"http://10.0.0.2:8080\", \"weight\": 3},\n"
                "{\"url\": \"http://api.internal\", \"backup\": true}], \"balance\": \"least_request\"}}}");
    CHECK(cfg != NULL);
    if (cfg == NULL) {
        printf("    %s\n", err);
        return;
    }
    const gw_backend_t *b = cfg->backends[0];
    CHECK(b->nservers == 3 && b->nprimary == 2 && b->balance == GW_BAL_LEAST);
    CHECK(b->servers[0].weight == 1 && !b->servers[0].backup && b->servers[0].index == 0);
    CHECK(b->servers[1].weight == 3 && b->servers[1].index == 1);
    CHECK(b->servers[2].backup && b->servers[2].index == 2);
    CHECK_STR(b->servers[1].label, "10.0.0.2:8080");
    CHECK_STR(b->servers[1].host_header, "10.0.0.2:8080");
    CHECK(b->servers[1].host_name == NULL && b->servers[1].port == 8080);
    CHECK_STR(b->servers[2].host_name, "api.internal");
    CHECK_STR(b->servers[2].label, "api.internal:80");
    CHECK(cfg->nnamed == 1);
    CHECK_STR(b->servers[0].conn_key, "http://10.0.0.1:8080|1000|");
    /* the backend's own fields: the first server's */
    CHECK_STR(b->url, "http://10.0.0.1:8080");
    CHECK_STR(b->host_header, "10.0.0.1:8080");
    CHECK(b->health_check == NULL && !b->outlier.enabled && b->hash_key == NULL);
    for (size_t i = 0; i < b->nservers; i++)
        CHECK(b->servers[i].hs != NULL && gw_cluster_usable(&b->servers[i], 1));
    gw_config_unref(cfg);

    /* the url shorthand: one server; TLS names per server */
    cfg = parse(US "{\"url\": \"https://10.0.0.1:8443\"}, \"o\": {\"servers\": [\"https://a.internal\", "
                "\"https://10.0.0.2\"], \"tls\": {\"verify\": false}}, \"s\": {\"servers\": [\"https://a.internal\", "
                "\"https://10.0.0.2\"], \"tls\": {\"server_name\": \"api.example.com\"}}}}");
    CHECK(cfg != NULL);
    if (cfg == NULL) {
        printf("    %s\n", err);
        return;
    }
    b = cfg->backends[0];
    CHECK(b->nservers == 1 && b->nprimary == 1 && b->servers[0].weight == 1 && b->balance == GW_BAL_RR);
    CHECK_STR(b->servers[0].tls_server_name, "10.0.0.1");
    CHECK(b->servers[0].tls_name_is_ip);
    b = cfg->backends[1];
    CHECK_STR(b->servers[0].tls_server_name, "a.internal");
    CHECK(!b->servers[0].tls_name_is_ip && b->servers[1].tls_name_is_ip);
    CHECK_STR(b->servers[1].label, "10.0.0.2:443");
    b = cfg->backends[2];
    CHECK_STR(b->servers[0].tls_server_name, "api.example.com");
    CHECK_STR(b->servers[1].tls_server_name, "api.example.com");
    CHECK(!b->servers[1].tls_name_is_ip);
    gw_config_unref(cfg);

    check_error(US "{\"url\": \"http://10.0.0.1\", \"servers\": [\"http://10.0.0.2\"]}}}",
                "backends.users.servers: \"url\" and \"servers\" both given");
    check_error(US "{\"timeout_ms\": 5}}}", "backends.users.url: is required (or \"servers\")");
    check_error(US "{\"servers\": []}}}", "backends.users.servers: must be a non-empty array");
    check_error(US "{\"servers\": \"http://10.0.0.1\"}}}", "backends.users.servers: must be a non-empty array");
    check_error(US "{\"servers\": [\"http://10.0.0.1\",\n 7]}}}", "t.json:2: backends.users.servers[1]: must be a URL like");
    check_error(US "{\"servers\": [\"http://10.0.0.1\", \"https://10.0.0.2\"]}}}",
                "backends.users.servers[1]: \"https://10.0.0.2\" is https but servers[0] is http: all servers of a "
                "backend use the same scheme");
    check_error(US "{\"servers\": [\"http://10.0.0.1\", \"http://10.0.0.2\", \"http://10.0.0.1:80/\"]}}}",
                "backends.users.servers[2]: \"http://10.0.0.1:80/\" is the same server as servers[0]");
    check_error(US "{\"servers\": [\"http://A.internal:81\", \"http://a.internal:81\"]}}}",
                "backends.users.servers[1]: \"http://a.internal:81\" is the same server as servers[0]");
    check_error(US "{\"servers\": [\"http://10.0.0.1\", {\"url\": \"http://10.0.0.2\", \"weight\": 0}]}}}",
                "backends.users.servers[1].weight: must be between 1 and 1000, not 0");
    check_error(US "{\"servers\": [\"http://10.0.0.1\", \"http://10.0.0.3\", {\"url\": \"http://10.0.0.2\", \"weight\": 1001}]}}}",
                "backends.users.servers[2].weight: must be between 1 and 1000, not 1001");
    check_error(US "{\"servers\": [{\"url\": \"http://10.0.0.2\", \"weight\": \"2\"}]}}}",
                "backends.users.servers[0].weight: must be an integer, not a string");
    check_error(US "{\"servers\": [{\"url\": \"http://10.0.0.2\", \"backup\": 1}]}}}",
                "backends.users.servers[0].backup: must be true or false");
    check_error(US "{\"servers\": [{\"url\": \"http://10.0.0.2\", \"wieght\": 1}]}}}",
                "backends.users.servers[0].wieght: unknown key \"wieght\" in a server");
    check_error(US "{\"servers\": [{\"weight\": 1}]}}}", "backends.users.servers[0].url: is required");
    check_error(US "{\"servers\": [\"http://10.0.0.1\", \"ftp://10.0.0.2\"]}}}",
                "backends.users.servers[1]: must start with http:// or https://");
    check_error(US "{\"servers\": [{\"url\": \"http://10.0.0.1/x\"}]}}}", "backends.users.servers[0].url: a backend URL has no path");
    check_error(US "{\"servers\": [{\"url\": \"http://10.0.0.1\", \"backup\": true}]}}}",
                "backends.users.servers: every server is a backup");
    /* at most 32 */
    char text[4096];
    for (int n = 33; n >= 32; n--) {
        size_t len = (size_t)snprintf(text, sizeof(text), US "{\"servers\": [");
        for (int i = 0; i < n; i++)
            len += (size_t)snprintf(text + len, sizeof(text) - len, "%s\"http://10.0.1.%d\"", i ? ", " : "", i + 1);
        snprintf(text + len, sizeof(text) - len, "]}}}");
        if (n == 33)
            check_error(text, "backends.users.servers: at most 32 servers per backend (the request path keeps the "
                              "servers a call tried in a 32-bit mask), not 33");
    }
    cfg = parse(text);
    CHECK(cfg != NULL && cfg->backends[0]->nservers == 32);
    if (cfg == NULL)
        printf("    %s\n", err);
    gw_config_unref(cfg);
}

static void
test_balance_and_health(void)
{
    gw_config_t *cfg = parse(US "{\"servers\": [\"http://10.0.0.1\", \"http://10.0.0.2\"], \"balance\": \"hash\", "
                             "\"hash_key\": \"{header.X-User}:{query.u}:{id}\", \"health_check\": {}, "
                             "\"outlier_detection\": {}}, \"b\": {\"url\": \"http://10.0.0.3\", \"health_check\": "
                             "{\"path\": \"/ping?full=1\", \"interval_ms\": 500, \"timeout_ms\": 500, \"healthy\": 1, "
                             "\"unhealthy\": 10, \"statuses\": [200, 204]}, \"outlier_detection\": "
                             "{\"consecutive_failures\": 2, \"eject_ms\": 100, \"max_eject_ms\": 100, "
                             "\"max_ejected_percent\": 0}}}}");
    CHECK(cfg != NULL);
    if (cfg == NULL) {
        printf("    %s\n", err);
        return;
    }
    const gw_backend_t *b = cfg->backends[0];
    CHECK(b->balance == GW_BAL_HASH && b->hash_key != NULL);
    const gw_hc_conf_t *hc = b->health_check;
    CHECK(hc != NULL && strcmp(hc->path, "/healthz") == 0 && hc->interval_ms == 2000 && hc->timeout_ms == 1000 &&
          hc->healthy == 2 && hc->unhealthy == 3 && hc->nstatuses == 1 && hc->statuses[0] == 200);
    CHECK(b->outlier.enabled && b->outlier.consecutive_failures == 5 && b->outlier.eject_ms == 10000 &&
          b->outlier.max_eject_ms == 300000 && b->outlier.max_ejected_percent == 50);
    b = cfg->backends[1];
    hc = b->health_check;
    CHECK(b->balance == GW_BAL_RR);
    CHECK(hc != NULL && strcmp(hc->path, "/ping?full=1") == 0 && hc->interval_ms == 500 && hc->timeout_ms == 500 &&
          hc->healthy == 1 && hc->unhealthy == 10 && hc->nstatuses == 2 && hc->statuses[1] == 204);
    CHECK(b->outlier.enabled && b->outlier.consecutive_failures == 2 && b->outlier.eject_ms == 100 &&
          b->outlier.max_eject_ms == 100 && b->outlier.max_ejected_percent == 0);
    gw_config_unref(cfg);

#define UB(x) US "{\"url\": \"http://10.0.0.1\", " x "}}}"
    check_error(UB("\"balance\": \"random\""),
                "backends.users.balance: must be \"round_robin\", \"least_request\" or \"hash\"");
    check_error(UB("\"balance\": 1"), "backends.users.balance: must be");
    check_error(UB("\"balance\": \"hash\""), "backends.users.balance: \"hash\" needs \"hash_key\"");
    check_error(UB("\"hash_key\": \"{id}\""), "backends.users.hash_key: is only used with \"balance\": \"hash\"");
    check_error(UB("\"balance\": \"hash\", \"hash_key\": \"\""), "backends.users.hash_key: must be a non-empty template");
    check_error(UB("\"balance\": \"hash\", \"hash_key\": \"{header.}\""), "backends.users.hash_key: ");
    check_error(UB("\"balance\": \"hash\", \"hash_key\": \"{item}\""), "backends.users.hash_key: ");
    check_error(UB("\"balance\": \"hash\", \"hash_key\": \"{id\""), "backends.users.hash_key: ");

    check_error(UB("\"health_check\": true"), "backends.users.health_check: must be an object");
    check_error(UB("\"health_check\": {\"pth\": \"/\"}"),
                "backends.users.health_check.pth: unknown key \"pth\" in \"health_check\"");
    check_error(UB("\"health_check\": {\"path\": \"healthz\"}"),
                "backends.users.health_check.path: must be a path starting with \"/\"");
    check_error(UB("\"health_check\": {\"path\": \"/a b\"}"), "backends.users.health_check.path: must be a path");
    check_error(UB("\"health_check\": {\"path\": 1}"), "backends.users.health_check.path: must be a path");
    check_error(UB("\"health_check\": {\"interval_ms\": 50}"),
                "backends.users.health_check.interval_ms: must be between 100 and 3600000, not 50");
    check_error(UB("\"health_check\": {\"timeout_ms\": 0}"),
                "backends.users.health_check.timeout_ms: must be between 10 and 60000, not 0");
    check_error(UB("\"health_check\": {\"timeout_ms\": 3000}"),
                "backends.users.health_check.timeout_ms: must not be above interval_ms (2000)");
    check_error(UB("\"health_check\": {\"healthy\": 0}"), "backends.users.health_check.healthy: must be between 1 and 100");
    check_error(UB("\"health_check\": {\"unhealthy\": 101}"),
                "backends.users.health_check.unhealthy: must be between 1 and 100");
    check_error(UB("\"health_check\": {\"statuses\": []}"),
                "backends.users.health_check.statuses: must be a non-empty array of at most 16 statuses");
    check_error(UB("\"health_check\": {\"statuses\": [200, 201, 202, 203, 204, 205, 206, 207, 208, 209, 210, 211, 212, "
                   "213, 214, 215, 216]}"),
                "backends.users.health_check.statuses: must be a non-empty array of at most 16 statuses");
    check_error(UB("\"health_check\": {\"statuses\": [200, 99]}"),
                "backends.users.health_check.statuses[1]: must be a status between 100 and 599");
    check_error(UB("\"health_check\": {\"statuses\": [600]}"),
                "backends.users.health_check.statuses[0]: must be a status between 100 and 599");
    check_error(UB("\"health_check\": {\"statuses\": [200, 200]}"),
                "backends.users.health_check.statuses[1]: status 200 is listed twice");

    check_error(UB("\"outlier_detection\": 5"), "backends.users.outlier_detection: must be an object");
    check_error(UB("\"outlier_detection\": {\"consecutive\": 5}"),
                "backends.users.outlier_detection.consecutive: unknown key \"consecutive\" in \"outlier_detection\"");
    check_error(UB("\"outlier_detection\": {\"consecutive_failures\": 0}"),
                "backends.users.outlier_detection.consecutive_failures: must be between 1 and 100000, not 0");
    check_error(UB("\"outlier_detection\": {\"eject_ms\": 0}"), "backends.users.outlier_detection.eject_ms: must be between 1");
    check_error(UB("\"outlier_detection\": {\"eject_ms\": 5000, \"max_eject_ms\": 1000}"),
                "backends.users.outlier_detection.max_eject_ms: must not be below eject_ms (5000)");
    check_error(UB("\"outlier_detection\": {\"max_ejected_percent\": 101}"),
                "backends.users.outlier_detection.max_ejected_percent: must be between 0 and 100, not 101");
#undef UB
}
#undef US

/* A cached call's scope follows every server of its backend: a reload
 * keeps its entries (gw_cache_scope_same) when the set of servers and
 * their connection settings are the same, in any order, weights and
 * balance aside, and drops them when any server changes. */
static gw_cache_scope_t *
cache_scope_of(const char *servers, const char *more)
{
    char text[1024];
    snprintf(text, sizeof(text),
             "{\"listen\": \"127.0.0.1:1\", \"backends\": {\"p\": {\"servers\": %s%s}},\n"
             " \"routes\": [{\"path\": \"/a\", \"calls\": [{\"name\": \"c\", \"backend\": \"p\", \"path\": \"/x\",\n"
             "   \"cache\": {\"ttl_ms\": 1000}}]}]}",
             servers, more);
    gw_config_t *cfg = parse(text);
    CHECK(cfg != NULL);
    if (cfg == NULL) {
        printf("    %s\n", err);
        return NULL;
    }
    gw_cache_scope_t *s = cfg->routes[0]->agg.calls[0]->cache;
    CHECK(s != NULL);
    if (s)
        gw_cache_scope_ref(s);
    gw_config_unref(cfg);
    return s;
}

static void
test_cache_scope_servers(void)
{
    gw_cache_scope_t *a = cache_scope_of("[\"http://10.0.0.1:80\", \"http://10.0.0.2:80\"]", "");
    struct {
        const char *servers, *more;
        bool same;
    } cases[] = {
        { "[\"http://10.0.0.1:80\", \"http://10.0.0.2:80\"]", "", true },
        { "[\"http://10.0.0.2:80\", {\"url\": \"http://10.0.0.1:80\", \"weight\": 5}]", ", \"balance\": \"least_request\"",
          true },
        { "[\"http://10.0.0.1:80\", \"http://10.0.0.3:80\"]", "", false }, /* the second server only */
        { "[\"http://10.0.0.1:80\"]", "", false },
        { "[\"http://10.0.0.1:80\", \"http://10.0.0.2:80\", \"http://10.0.0.3:80\"]", "", false },
        { "[\"http://10.0.0.1:80\", \"http://10.0.0.2:80\"]", ", \"connect_timeout_ms\": 50", false },
    };
    for (size_t i = 0; a && i < sizeof(cases) / sizeof(cases[0]); i++) {
        gw_cache_scope_t *b = cache_scope_of(cases[i].servers, cases[i].more);
        if (b && gw_cache_scope_same(a, b) != cases[i].same) {
            printf("    case %zu: %s%s\n", i, cases[i].servers, cases[i].more);
            CHECK(false);
        }
        gw_cache_scope_unref(b);
    }
    gw_cache_scope_unref(a);
    gw_cache_shutdown();
}

TEST_MAIN(T(test_minimal_and_defaults), T(test_full), T(test_text_body), T(test_workers_override), T(test_syntax_error_has_line_and_column),
          T(test_unknown_keys_with_line), T(test_types_and_ranges), T(test_bad_addresses), T(test_routes), T(test_backends_and_proxy),
          T(test_backend_host_names), T(test_resolver), T(test_aggregate_route), T(test_aggregate_route_keys),
          T(test_aggregate_call_errors), T(test_aggregate_templates), T(test_aggregate_headers),
          T(test_aggregate_groups_and_foreach), T(test_aggregate_shaping), T(test_aggregate_error_names_line),
          T(test_aggregate_when), T(test_aggregate_into), T(test_aggregate_batch),
          T(test_include), T(test_retry), T(test_missing_file), T(test_trusted_proxies_and_max_inflight), T(test_rate_limit),
          T(test_rate_limit_inherit), T(test_shipped_configs_are_valid), T(test_backend_resilience), T(test_log),
          T(test_servers), T(test_balance_and_health), T(test_cache_scope_servers))
