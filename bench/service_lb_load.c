/* The load of bench/service_lb.py, in C so the client and server are not what is measured.
 *   serve-close PORT          accept and close, forever
 *   serve-echo PORT           accept one connection at a time and echo it
 *   connect ADDR PORT SECS    open and reset connections for SECS; prints connections per second
 *   pingpong ADDR PORT COUNT  COUNT round trips of 64 bytes on one connection; prints p50 p99 (us)
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static struct sockaddr_in addr_of(const char *ip, int port) {
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    inet_pton(AF_INET, ip, &a.sin_addr);
    return a;
}

static int listener(int port) {
    int s = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    struct sockaddr_in a = addr_of("0.0.0.0", port);
    if (bind(s, (struct sockaddr *)&a, sizeof(a)) || listen(s, 4096)) {
        perror("listen");
        exit(1);
    }
    return s;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

int main(int argc, char **argv) {
    if (argc == 3 && !strcmp(argv[1], "serve-close")) {
        int s = listener(atoi(argv[2]));
        for (;;) {
            int c = accept(s, NULL, NULL);
            if (c >= 0)
                close(c);
        }
    }
    if (argc == 3 && !strcmp(argv[1], "serve-echo")) {
        int s = listener(atoi(argv[2]));
        char buf[4096];
        for (;;) {
            int c = accept(s, NULL, NULL), one = 1;
            setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
            ssize_t n;
            while ((n = recv(c, buf, sizeof(buf), 0)) > 0)
                send(c, buf, n, 0);
            close(c);
        }
    }
    if (argc == 5 && !strcmp(argv[1], "connect")) {
        struct sockaddr_in a = addr_of(argv[2], atoi(argv[3]));
        double secs = atof(argv[4]), end = now() + secs;
        long n = 0;
        struct linger reset = {1, 0}; /* close with a reset: no TIME_WAIT, the client never runs out of ports */
        struct timeval limit = {2, 0};     /* a lost connection fails the run instead of hanging it */
        while (now() < end) {
            int c = socket(AF_INET, SOCK_STREAM, 0);
            setsockopt(c, SOL_SOCKET, SO_SNDTIMEO, &limit, sizeof(limit));
            if (connect(c, (struct sockaddr *)&a, sizeof(a))) {
                perror("connect");
                return 1;
            }
            setsockopt(c, SOL_SOCKET, SO_LINGER, &reset, sizeof(reset));
            close(c);
            n++;
        }
        printf("%.1f\n", n / secs);
        return 0;
    }
    if (argc == 5 && !strcmp(argv[1], "pingpong")) {
        struct sockaddr_in a = addr_of(argv[2], atoi(argv[3]));
        int count = atoi(argv[4]), c = socket(AF_INET, SOCK_STREAM, 0), one = 1;
        if (connect(c, (struct sockaddr *)&a, sizeof(a))) {
            perror("connect");
            return 1;
        }
        setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        double *us = calloc(count, sizeof(double));
        char msg[64] = {0}, buf[64];
        for (int i = 0; i < count; i++) {
            double t = now();
            send(c, msg, sizeof(msg), 0);
            size_t got = 0;
            while (got < sizeof(msg)) {
                ssize_t n = recv(c, buf, sizeof(buf) - got, 0);
                if (n <= 0) {
                    perror("recv");
                    return 1;
                }
                got += n;
            }
            us[i] = (now() - t) * 1e6;
        }
        qsort(us, count, sizeof(double), cmp);
        printf("%.1f %.1f\n", us[count / 2], us[(int)(count * 0.99)]);
        return 0;
    }
    fprintf(stderr, "usage: see the comment at the top of service_lb_load.c\n");
    return 2;
}
