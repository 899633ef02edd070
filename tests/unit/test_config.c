/* Unit tests for src/gw_config.c: defaults, strictness, error messages
 * with file, line and JSON path, includes. */
#include "gw_config.h"
#include "gw_test.h"

#include <arpa/inet.h>
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

    char cmd[700];
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
    CHECK(system(cmd) == 0);
}

static void
test_missing_file(void)
{
    gw_config_t *cfg = gw_config_load("/nonexistent/gatherd.json", 0, err, sizeof(err));
    CHECK(cfg == NULL);
    CHECK_CONTAINS(err, "/nonexistent/gatherd.json: cannot open: No such file or directory");
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

TEST_MAIN(T(test_minimal_and_defaults), T(test_full), T(test_text_body), T(test_workers_override), T(test_syntax_error_has_line_and_column),
          T(test_unknown_keys_with_line), T(test_types_and_ranges), T(test_bad_addresses), T(test_routes), T(test_backends_and_proxy),
          T(test_backend_host_names), T(test_resolver),
          T(test_include), T(test_missing_file), T(test_shipped_configs_are_valid))
