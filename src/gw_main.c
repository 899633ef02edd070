/*
 * gw_main.c - the command line, start-up and signals.
 *
 * The main thread owns no connections: it loads the configuration, starts
 * the workers, then waits for signals with sigtimedwait() (every thread
 * blocks them, so no handler ever runs on a worker). SIGTERM and SIGINT
 * stop gracefully; a second one stops at once.
 */
#include "gw_config.h"
#include "gw_log.h"
#include "gw_server.h"

#include <errno.h>
#include <event2/event.h>
#include <getopt.h>
#include <jansson.h>
#include <llhttp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#ifndef GW_DEFAULT_CONF
#define GW_DEFAULT_CONF "/etc/gatherd/gatherd.json"
#endif
#define GW_SOURCE_CONF "conf/gatherd.json"

static void
usage(FILE *f)
{
    fprintf(f,
            "Usage: gatherd [-t] [-c FILE] [-w N] [-l LEVEL]\n"
            "  -c FILE   configuration file (default: %s when it exists, else %s)\n"
            "  -t        check the configuration and exit (0: valid, 1: invalid)\n"
            "  -w N      number of worker threads, overriding \"workers\"\n"
            "  -l LEVEL  log level: debug, info, notice (default), warn, error\n"
            "  -V        print the version and exit\n"
            "  -h        print this help and exit\n"
            "Signals: TERM/INT stop gracefully (a second one stops at once).\n",
            GW_SOURCE_CONF, GW_DEFAULT_CONF);
}

static int
parse_level(const char *s, gw_log_level_t *out)
{
    static const char *const names[] = { "debug", "info", "notice", "warn", "error" };
    for (size_t i = 0; i < GW_NELEM(names); i++)
        if (strcmp(s, names[i]) == 0) {
            *out = (gw_log_level_t)i;
            return GW_OK;
        }
    return GW_ERR;
}

int
main(int argc, char **argv)
{
    const char *file = NULL;
    bool test_only = false;
    int workers = 0;
    int opt;
    while ((opt = getopt(argc, argv, "c:tw:l:Vh")) != -1) {
        switch (opt) {
        case 'c':
            file = optarg;
            break;
        case 't':
            test_only = true;
            break;
        case 'w': {
            char *end;
            long n = strtol(optarg, &end, 10);
            if (*end != '\0' || n < 1 || n > GW_CONF_MAX_WORKERS) {
                fprintf(stderr, "gatherd: -w wants a number between 1 and %d\n", GW_CONF_MAX_WORKERS);
                return 1;
            }
            workers = (int)n;
            break;
        }
        case 'l': {
            gw_log_level_t level;
            if (parse_level(optarg, &level) != GW_OK) {
                fprintf(stderr, "gatherd: unknown log level \"%s\"\n", optarg);
                return 1;
            }
            gw_log_set_level(level);
            break;
        }
        case 'V':
            printf("gatherd %s\n", PACKAGE_VERSION);
            printf("libevent %s, jansson %s, llhttp %d.%d.%d\n", event_get_version(), JANSSON_VERSION,
                   LLHTTP_VERSION_MAJOR, LLHTTP_VERSION_MINOR, LLHTTP_VERSION_PATCH);
            return 0;
        case 'h':
            usage(stdout);
            return 0;
        default:
            usage(stderr);
            return 1;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "gatherd: unexpected argument \"%s\"\n", argv[optind]);
        usage(stderr);
        return 1;
    }
    if (file == NULL)
        file = access(GW_SOURCE_CONF, R_OK) == 0 ? GW_SOURCE_CONF : GW_DEFAULT_CONF;

    char err[2048];
    gw_config_t *cfg = gw_config_load(file, workers, err, sizeof(err));
    if (test_only) {
        if (cfg == NULL) {
            fprintf(stderr, "gatherd: %s\ngatherd: configuration file %s test failed\n", err, file);
            return 1;
        }
        fprintf(stderr, "gatherd: configuration file %s syntax is ok\n"
                        "gatherd: configuration file %s test is successful (%zu routes, %d workers)\n",
                file, file, cfg->nroutes, cfg->workers);
        gw_config_unref(cfg);
        return 0;
    }
    if (cfg == NULL) {
        gw_log(GW_LOG_EMERG, "%s", err);
        return 1;
    }

    signal(SIGPIPE, SIG_IGN);
    sigset_t sigs;
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGTERM);
    sigaddset(&sigs, SIGINT);
    sigaddset(&sigs, SIGHUP);
    sigaddset(&sigs, SIGQUIT);
    pthread_sigmask(SIG_BLOCK, &sigs, NULL); /* inherited by every worker */

    gw_server_t srv;
    if (gw_server_start(&srv, cfg, err, sizeof(err)) != GW_OK) {
        gw_log(GW_LOG_EMERG, "%s", err);
        gw_server_stop(&srv, true);
        gw_server_free(&srv);
        gw_config_unref(cfg);
        return 1;
    }
    for (size_t i = 0; i < cfg->nlisten; i++)
        gw_log(GW_LOG_NOTICE, "listening on %s", cfg->listen[i].text);
    for (size_t i = 0; i < cfg->nbackends; i++)
        if (cfg->backends[i]->tls && !cfg->backends[i]->tls_verify)
            gw_log(GW_LOG_WARN, "backend %s: TLS certificate verification is OFF (tls.verify: false); "
                                "anyone on the path can impersonate it", cfg->backends[i]->name);
    gw_log(GW_LOG_NOTICE, "gatherd %s started: %d workers, %zu routes, configuration %s", PACKAGE_VERSION,
           cfg->workers, cfg->nroutes, file);

    bool stopping = false;
    struct timespec tick = { 0, 100 * 1000 * 1000 };
    for (;;) {
        int sig = sigtimedwait(&sigs, NULL, &tick);
        if (sig == SIGTERM || sig == SIGINT || sig == SIGQUIT) {
            bool force = stopping || sig == SIGQUIT;
            gw_log(GW_LOG_NOTICE, "signal %d (%s): %s", sig, strsignal(sig),
                   force ? "stopping now" : "stopping gracefully");
            gw_server_stop(&srv, force);
            stopping = true;
        } else if (sig == SIGHUP) {
            gw_log(GW_LOG_WARN, "SIGHUP: configuration reload is not supported by this version; ignored");
        } else if (sig < 0 && errno != EAGAIN && errno != EINTR) {
            gw_log(GW_LOG_ERR, "sigtimedwait: %s", strerror(errno));
        }
        if (gw_server_done(&srv))
            break;
    }
    gw_server_free(&srv);
    gw_config_unref(cfg);
    gw_log(GW_LOG_NOTICE, "stopped");
    libevent_global_shutdown();
    return 0;
}
