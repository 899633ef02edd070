/* Unit tests for src/gw_dns.c: the hosts file (format, case, final dot,
 * aliases, both families; one that cannot be read), resolv.conf as evdns
 * reads it, round robin, addresses marked down, and a name whose query is
 * still out when it is freed (the cancelled callback is reaped by
 * gw_dns_free: the ASan build sees a leak otherwise). The DNS side proper
 * runs in tests/integration/test_dns.py against a DNS stub. */
#include "gw_config.h"
#include "gw_dns.h"
#include "gw_test.h"

#include <arpa/inet.h>
#include <event2/event.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static char err[2048];
static char hosts_path[64];

/* A configuration whose resolver reads our hosts file and whose only
 * nameserver is a loopback port nobody answers on. */
static gw_config_t *
config(void)
{
    char text[1024];
    snprintf(text, sizeof(text),
             "{\"listen\": [\"1\"], \"resolver\": {\"nameservers\": [\"127.0.0.1:9\"], \"hosts_file\": \"%s\","
             " \"max_ttl_ms\": 60000}, \"backends\": {\"b\": {\"url\": \"http://web.test:8080\"}}}",
             hosts_path);
    gw_config_t *cfg = gw_config_parse(text, "t.json", ".", 0, err, sizeof(err));
    if (cfg == NULL)
        printf("    %s\n", err);
    return cfg;
}

/* The resolver of cfg for worker id, from freshly loaded files. */
static gw_dns_t *
dns_new(struct event_base *base, gw_config_t *cfg, int id)
{
    gw_dns_sys_t *sys = gw_dns_sys_load(cfg, NULL, err, sizeof(err));
    CHECK(sys != NULL);
    if (sys == NULL)
        return NULL;
    gw_dns_t *dns = gw_dns_new(base, cfg, sys, id, err, sizeof(err));
    gw_dns_sys_unref(sys); /* the resolver holds its own reference */
    return dns;
}

static void
noop_cb(gw_dns_name_t *n, void *arg)
{
    GW_UNUSED(n);
    GW_UNUSED(arg);
}

static const char *
ip_of(const gw_dns_addr_t *a, char *buf, size_t len)
{
    if (a->sa.ss_family == AF_INET)
        inet_ntop(AF_INET, &((const struct sockaddr_in *)&a->sa)->sin_addr, buf, (socklen_t)len);
    else
        inet_ntop(AF_INET6, &((const struct sockaddr_in6 *)&a->sa)->sin6_addr, buf, (socklen_t)len);
    return buf;
}

static uint16_t
port_of(const gw_dns_addr_t *a)
{
    return ntohs(a->sa.ss_family == AF_INET ? ((const struct sockaddr_in *)&a->sa)->sin_port
                                            : ((const struct sockaddr_in6 *)&a->sa)->sin6_port);
}

static void
test_hosts_file_and_round_robin(void)
{
    gw_config_t *cfg = config();
    CHECK(cfg != NULL);
    if (cfg == NULL)
        return;
    struct event_base *base = event_base_new();
    gw_dns_t *dns = dns_new(base, cfg, 0);
    CHECK(dns != NULL);
    gw_dns_name_t n;
    /* any case, a final dot: the same name */
    gw_dns_name_init(&n, dns, "WEB.test.", 8080, noop_cb, NULL);
    const gw_dns_addr_t *a;
    size_t idx;
    char ip[64];
    CHECK(gw_dns_name_pick(&n, &a, &idx) == GW_OK);
    CHECK(n.from_hosts && n.query == NULL && n.naddrs == 3);
    CHECK(n.ttl_ms == 60000 && n.expires > gw_dns_now_ms() + 50000);
    /* IPv4 entries first, in file order, duplicates once; then IPv6 */
    CHECK_STR(ip_of(&n.addrs[0], ip, sizeof(ip)), "127.0.0.3");
    CHECK_STR(ip_of(&n.addrs[1], ip, sizeof(ip)), "127.0.0.4");
    CHECK_STR(ip_of(&n.addrs[2], ip, sizeof(ip)), "::1");
    CHECK(port_of(&n.addrs[2]) == 8080);
    /* in turn */
    CHECK(idx == 0 && a == &n.addrs[0]);
    CHECK(gw_dns_name_pick(&n, &a, &idx) == GW_OK && idx == 1);
    CHECK(gw_dns_name_pick(&n, &a, &idx) == GW_OK && idx == 2);
    CHECK(gw_dns_name_pick(&n, &a, &idx) == GW_OK && idx == 0);
    /* an address marked down is skipped while others are up */
    gw_dns_name_mark_down(&n, n.gen, 1);
    CHECK(gw_dns_name_pick(&n, &a, &idx) == GW_OK && idx == 2);
    CHECK(gw_dns_name_pick(&n, &a, &idx) == GW_OK && idx == 0);
    CHECK(gw_dns_name_pick(&n, &a, &idx) == GW_OK && idx == 2);
    /* a mark for another generation of addresses is ignored */
    gw_dns_name_mark_down(&n, n.gen + 1, 0);
    CHECK(gw_dns_name_pick(&n, &a, &idx) == GW_OK && idx == 0);
    /* all down: used in turn anyway (better a try than a certain failure) */
    gw_dns_name_mark_down(&n, n.gen, 0);
    gw_dns_name_mark_down(&n, n.gen, 2);
    size_t seen = 0;
    for (int i = 0; i < 3; i++) {
        CHECK(gw_dns_name_pick(&n, &a, &idx) == GW_OK);
        seen |= (size_t)1 << idx;
    }
    CHECK(seen == 7);
    CHECK(gw_dns_name_has(&n, (const struct sockaddr *)&n.addrs[1].sa, n.addrs[1].len));
    struct sockaddr_in other = { .sin_family = AF_INET, .sin_port = htons(8080) };
    inet_pton(AF_INET, "127.0.0.9", &other.sin_addr);
    CHECK(!gw_dns_name_has(&n, (const struct sockaddr *)&other, sizeof(other)));
    size_t at = 99;
    CHECK(gw_dns_name_find(&n, (const struct sockaddr *)&n.addrs[2].sa, n.addrs[2].len, &at) && at == 2);
    CHECK(!gw_dns_name_find(&n, (const struct sockaddr *)&other, sizeof(other), &at) && at == 2);
    char list[128];
    CHECK_STR(gw_dns_name_list(&n, list, sizeof(list)), "127.0.0.3, 127.0.0.4, [::1]");
    gw_dns_name_free(&n);

    /* aliases resolve; another worker starts its turn elsewhere */
    gw_dns_t *dns1 = dns_new(base, cfg, 1);
    gw_dns_name_init(&n, dns1, "alias.test", 80, noop_cb, NULL);
    CHECK(gw_dns_name_pick(&n, &a, &idx) == GW_OK && n.naddrs == 2 && idx == 1);
    gw_dns_name_free(&n);
    /* a scoped address and a malformed line give nothing */
    gw_dns_name_init(&n, dns1, "scoped.test", 80, noop_cb, NULL);
    CHECK(gw_dns_name_pick(&n, &a, &idx) == GW_AGAIN); /* not in the file: a DNS query is out */
    CHECK(n.query != NULL && !n.from_hosts);
    gw_dns_name_free(&n); /* cancels it; gw_dns_free reaps the callback */
    gw_dns_free(dns1);
    gw_dns_free(dns);
    event_base_free(base);
    gw_config_unref(cfg);
}

static void
test_refresh_does_nothing_while_valid(void)
{
    gw_config_t *cfg = config();
    if (cfg == NULL)
        return;
    struct event_base *base = event_base_new();
    gw_dns_t *dns = dns_new(base, cfg, 0);
    gw_dns_name_t n;
    gw_dns_name_init(&n, dns, "web.test", 8080, noop_cb, NULL);
    gw_dns_name_refresh(&n); /* never resolved: resolves (from the file) */
    CHECK(n.naddrs == 3);
    unsigned gen = n.gen;
    uint64_t expires = n.expires;
    gw_dns_name_refresh(&n);
    CHECK(n.gen == gen && n.expires == expires && n.query == NULL);
    gw_dns_name_free(&n);
    gw_dns_free(dns);
    event_base_free(base);
    gw_config_unref(cfg);
}

/* A configuration without nameservers (resolv.conf is read) and with
 * hosts (NULL: no hosts file). */
static gw_config_t *
config_system(const char *hosts)
{
    char text[1024];
    snprintf(text, sizeof(text), "{\"listen\": [\"1\"], \"resolver\": {\"hosts_file\": %s%s%s}}",
             hosts ? "\"" : "", hosts ? hosts : "false", hosts ? "\"" : "");
    gw_config_t *cfg = gw_config_parse(text, "t.json", ".", 0, err, sizeof(err));
    if (cfg == NULL)
        printf("    %s\n", err);
    return cfg;
}

/* resolv.conf with text, loaded for cfg; NULL text: no such file. */
static gw_dns_sys_t *
load_resolv(gw_config_t *cfg, const char *text)
{
    char path[64];
    snprintf(path, sizeof(path), "/tmp/gw-test-resolv-XXXXXX");
    int fd = mkstemp(path);
    if (fd < 0)
        return NULL;
    if (text && write(fd, text, strlen(text)) < 0)
        perror("write");
    close(fd);
    if (text == NULL)
        unlink(path);
    gw_dns_sys_t *sys = gw_dns_sys_load(cfg, path, err, sizeof(err));
    unlink(path);
    return sys;
}

static const char *
ns_text(const gw_dns_sys_t *sys, size_t i, char *buf, size_t len)
{
    const struct sockaddr_storage *sa = &sys->ns[i];
    char ip[64];
    if (sa->ss_family == AF_INET)
        inet_ntop(AF_INET, &((const struct sockaddr_in *)sa)->sin_addr, ip, sizeof(ip));
    else
        inet_ntop(AF_INET6, &((const struct sockaddr_in6 *)sa)->sin6_addr, ip, sizeof(ip));
    snprintf(buf, len, "%s/%u", ip,
             ntohs(sa->ss_family == AF_INET ? ((const struct sockaddr_in *)sa)->sin_port
                                            : ((const struct sockaddr_in6 *)sa)->sin6_port));
    return buf;
}

static void
test_resolv_conf(void)
{
    gw_config_t *cfg = config_system(NULL);
    CHECK(cfg != NULL);
    if (cfg == NULL)
        return;
    char b[80];
    gw_dns_sys_t *sys = load_resolv(cfg, "# comment\n"
                                         "; another\n"
                                         "domain first.example\n"
                                         "nameserver 10.0.0.2\n"
                                         "nameserver\t10.0.0.2   # the same again\n"
                                         "nameserver fd00::53\n"
                                         "nameserver not-an-ip\n"
                                         "search a.example b.example\n"
                                         "options ndots:3 rotate timeout:1\n"
                                         "sortlist 10.0.0.0/8\n");
    CHECK(sys != NULL);
    if (sys != NULL) {
        CHECK(sys->nns == 3);
        CHECK_STR(ns_text(sys, 0, b, sizeof(b)), "10.0.0.2/53");
        CHECK_STR(ns_text(sys, 1, b, sizeof(b)), "10.0.0.2/53");
        CHECK_STR(ns_text(sys, 2, b, sizeof(b)), "fd00::53/53");
        /* the last of "domain" and "search" wins, as in evdns and the C library */
        CHECK(sys->nsearch == 2);
        CHECK_STR(sys->nsearch > 1 ? sys->search[1] : NULL, "b.example");
        CHECK(sys->noptions == 2);
        CHECK_STR(sys->noptions > 1 ? sys->options[1] : NULL, "timeout:1");
        CHECK(sys->nhosts == 0);
        /* a nameserver listed twice is not an error; no file is read here */
        struct event_base *base = event_base_new();
        gw_dns_t *dns = gw_dns_new(base, cfg, sys, 0, err, sizeof(err));
        CHECK(dns != NULL);
        gw_dns_free(dns);
        event_base_free(base);
        gw_dns_sys_unref(sys);
    }
    /* no nameserver, or no file: 127.0.0.1, as the C library does */
    sys = load_resolv(cfg, "search only.example\n");
    CHECK(sys != NULL && sys->nns == 1 && sys->nsearch == 1);
    if (sys)
        CHECK_STR(ns_text(sys, 0, b, sizeof(b)), "127.0.0.1/53");
    gw_dns_sys_unref(sys);
    sys = load_resolv(cfg, NULL);
    CHECK(sys != NULL && sys->nns == 1);
    gw_dns_sys_unref(sys);
    gw_config_unref(cfg);
}

static void
test_hosts_file_unreadable(void)
{
    /* a directory passes the configuration's check and fails the read */
    char dir[64];
    snprintf(dir, sizeof(dir), "/tmp/gw-test-hostsdir-XXXXXX");
    CHECK(mkdtemp(dir) != NULL);
    gw_config_t *cfg = config_system(dir);
    CHECK(cfg != NULL);
    if (cfg != NULL) {
        err[0] = '\0';
        CHECK(load_resolv(cfg, "nameserver 10.0.0.2\n") == NULL);
        CHECK_CONTAINS(err, "cannot read the hosts file");
        CHECK_CONTAINS(err, "Is a directory");
        gw_config_unref(cfg);
    }
    rmdir(dir);
    /* one that went away since the configuration was checked: no entries, no error */
    char path[64];
    snprintf(path, sizeof(path), "/tmp/gw-test-hosts2-XXXXXX");
    int fd = mkstemp(path);
    CHECK(fd >= 0);
    close(fd);
    cfg = config_system(path);
    unlink(path);
    CHECK(cfg != NULL);
    if (cfg != NULL) {
        gw_dns_sys_t *sys = load_resolv(cfg, "nameserver 10.0.0.2\n");
        CHECK(sys != NULL && sys->nhosts == 0);
        gw_dns_sys_unref(sys);
        gw_config_unref(cfg);
    }
}

TEST_MAIN(T(test_hosts_file_and_round_robin), T(test_refresh_does_nothing_while_valid), T(test_resolv_conf),
          T(test_hosts_file_unreadable))

/* The hosts file exists for the whole run (made before main's tests). */
__attribute__((constructor)) static void
make_hosts_file(void)
{
    snprintf(hosts_path, sizeof(hosts_path), "/tmp/gw-test-hosts-XXXXXX");
    int fd = mkstemp(hosts_path);
    if (fd < 0)
        return;
    static const char text[] = "# comment line\n"
                               "\n"
                               "127.0.0.3   web.test alias.test   # trailing comment\n"
                               "::1\tweb.test\talias.test\n"
                               "127.0.0.4 Web.Test\n"
                               "127.0.0.3 web.test\n"
                               "fe80::1%lo scoped.test\n"
                               "not-an-address scoped.test\n";
    if (write(fd, text, sizeof(text) - 1) < 0)
        perror("write");
    close(fd);
}

__attribute__((destructor)) static void
remove_hosts_file(void)
{
    unlink(hosts_path);
}
