/* Exact best max GPU load of one layer with at most k changed slots (branch and bound). */
#include <stdlib.h>
#include <string.h>
#include <math.h>

#define KMAX 8

typedef struct {
    int E, P, G, S;
    const double *load;
    int *slot_exp, *cnt;
    unsigned char *changed;
    double best, delta, slack, floor_;
    int sol[KMAX][2], nsol;
    int best_sol[KMAX][2], nbest;
    long long nodes, limit;
    int stop; /* 1: floor reached (exact), 2: node limit (not exact) */
    double *dl; int *mark; int stamp;
} Ctx;

static double share_of(const Ctx *c, int e) { return c->cnt[e] > 0 ? c->load[e] / c->cnt[e] : 0.0; }

static void gpu_loads(const Ctx *c, double *gl) {
    for (int g = 0; g < c->G; g++) {
        double s = 0.0;
        for (int a = 0; a < c->S; a++) s += share_of(c, c->slot_exp[g * c->S + a]);
        gl[g] = s;
    }
}

/* whether GPU g holds a replica of e */
static int gpu_holds(const Ctx *c, int g, int e) {
    for (int b = 0; b < c->S; b++) if (c->slot_exp[g * c->S + b] == e) return 1;
    return 0;
}

/* for the n GPUs in set: mark them in in[g], and count in hc[e] how many of them hold e */
static void count_holders(const Ctx *c, const int *set, int n, int *hc, unsigned char *in) {
    for (int i = 0; i < n; i++) {
        int g = set[i];
        in[g] = 1;
        for (int a = 0; a < c->S; a++) {
            int e = c->slot_exp[g * c->S + a], dup = 0;
            for (int b = 0; b < a; b++) dup |= c->slot_exp[g * c->S + b] == e;
            if (!dup) hc[e]++;
        }
    }
}

static void sort_desc(double *v, int n) {
    for (int i = 1; i < n; i++) {
        double x = v[i]; int k = i - 1;
        while (k >= 0 && v[k] < x) { v[k + 1] = v[k]; k--; }
        v[k + 1] = x;
    }
}

/* Upper bound on the drop of GPU g's load with 0..j more changes (see the Python docstring). */
static void maxred(const Ctx *c, int g, int j, double *out) {
    int S = c->S;
    double ns[16], so[16], marg[16 * KMAX];
    int nns = 0, nso = 0, nm = 0;
    for (int a = 0; a < S; a++) {
        int e = c->slot_exp[g * S + a];
        double ld = c->load[e], cn = (double)c->cnt[e];
        int nge = 0;
        for (int b = 0; b < S; b++) nge += c->slot_exp[g * S + b] == e;
        double sh = ld / cn;
        if (c->cnt[e] <= 1) so[nso++] = sh; else ns[nns++] = sh;
        for (int m = 1; m <= j; m++) marg[nm++] = nge * ld * (1.0 / (cn + m - 1) - 1.0 / (cn + m));
    }
    sort_desc(ns, nns); sort_desc(so, nso); sort_desc(marg, nm);
    double cns[17] = {0}, cso[17] = {0}, cm[16 * KMAX + 1];
    cm[0] = 0;
    for (int i = 0; i < nns; i++) cns[i + 1] = cns[i] + ns[i];
    for (int i = 0; i < nso; i++) cso[i + 1] = cso[i] + so[i];
    for (int i = 0; i < nm; i++) cm[i + 1] = cm[i] + marg[i];
    for (int i = 0; i <= j; i++) out[i] = 0.0;
    for (int a0 = 0; a0 <= nns && a0 <= j; a0++)
        for (int a1 = 0; a1 <= nso && a1 <= j; a1++)
            for (int n = 0; n <= j; n++) {
                int cost = (a0 + a1 > n ? a0 + a1 : n) + a1;
                if (cost > j) continue;
                double v = cns[a0] + cso[a1] + cm[n < nm ? n : nm];
                for (int i = cost; i <= j; i++) if (v > out[i]) out[i] = v;
            }
    for (int i = 0; i <= j; i++) out[i] = out[i] * (1 + 1e-12) + c->slack;
}

/* New max GPU load and validity after the single change (s, e), from loads gl with
 * desc order `ord`; holders: CSR lists of slots per expert (head/next). */
static int g_touched[1024], g_nt;
static double eval_change(Ctx *c, const double *gl, const int *ord, const int *head, const int *next,
                          int s, int e, int nmiss, int *valid) {
    int S = c->S, x = c->slot_exp[s];
    double lx = c->load[x], le = c->load[e];
    int cx = c->cnt[x], ce = c->cnt[e];
    double shx = lx / cx;
    double dx = cx > 1 ? lx / (cx - 1) - shx : 0.0;
    double nse = le / (ce + 1);
    double de = ce > 0 ? nse - le / ce : 0.0;
    int touched[1024]; int nt = 0;
    c->stamp++;
#define TOUCH(g, v) do { int _g = (g); if (c->mark[_g] != c->stamp) { c->mark[_g] = c->stamp; c->dl[_g] = 0.0; if (nt < 1024) touched[nt++] = _g; } c->dl[_g] += (v); } while (0)
    if (dx != 0.0) for (int t = head[x]; t >= 0; t = next[t]) TOUCH(t / S, dx);
    if (de != 0.0) for (int t = head[e]; t >= 0; t = next[t]) TOUCH(t / S, de);
    TOUCH(s / S, nse - shx - dx);
#undef TOUCH
    double m = -INFINITY;
    for (int i = 0; i < nt; i++) { double v = gl[touched[i]] + c->dl[touched[i]]; if (v > m) m = v; }
    for (int i = 0; i < c->G; i++) if (c->mark[ord[i]] != c->stamp) { if (gl[ord[i]] > m) m = gl[ord[i]]; break; }
    memcpy(g_touched, touched, sizeof(int) * nt); g_nt = nt;
    *valid = (nmiss - (ce == 0) + (cx == 1)) == 0;
    return m;
}

static double *g_sortkey;
static int cmp_key(const void *a, const void *b) {
    double x = g_sortkey[*(const int *)a], y = g_sortkey[*(const int *)b];
    return (x > y) - (x < y);
}
static const double *g_gl;
static int cmp_gl_desc(const void *a, const void *b) {
    double x = g_gl[*(const int *)a], y = g_gl[*(const int *)b];
    return (x < y) - (x > y);
}

static void apply(Ctx *c, int s, int e, int *old) {
    *old = c->slot_exp[s];
    c->cnt[*old]--; c->cnt[e]++; c->slot_exp[s] = e; c->changed[s] = 1;
}
static void undo(Ctx *c, int s, int e, int old) {
    c->cnt[e]--; c->cnt[old]++; c->slot_exp[s] = old; c->changed[s] = 0;
}

static void record(Ctx *c, double M) {
    c->best = M;
    c->nbest = c->nsol;
    memcpy(c->best_sol, c->sol, sizeof(c->sol));
    if (M <= c->floor_ + c->delta) c->stop = 1;
}

static void node(Ctx *c, int r) {
    int E = c->E, P = c->P, G = c->G, S = c->S;
    if (c->stop) return;
    if (++c->nodes > c->limit) { c->stop = 2; return; }
    double *gl = malloc(sizeof(double) * G);
    gpu_loads(c, gl);
    double M = -INFINITY; int nmiss = 0;
    for (int g = 0; g < G; g++) if (gl[g] > M) M = gl[g];
    for (int e = 0; e < E; e++) nmiss += c->cnt[e] == 0;
    if (nmiss == 0 && M < c->best - c->delta) record(c, M);
    if (r == 0 || nmiss > r || c->stop) { free(gl); return; }
    double T = c->best - c->delta;
    int *H = malloc(sizeof(int) * G), nH = 0;
    for (int g = 0; g < G; g++) if (gl[g] >= T) H[nH++] = g;
    int *U = malloc(sizeof(int) * G), nU = 0;
    int *needg = calloc(G, sizeof(int)); int sumneed_all = 0, fallback = 0;
    int cap = (S * E + S * P) * (nH > 0 ? nH : 1) + P + 16;
    int *cs = malloc(sizeof(int) * cap), *ce_ = malloc(sizeof(int) * cap), n = 0;
    if (nH == 0) {
        int m = 0; while (c->cnt[m] != 0) m++;
        for (int s = 0; s < P; s++) if (!c->changed[s] && c->slot_exp[s] != m) { cs[n] = s; ce_[n] = m; n++; }
    } else {
        double red[KMAX + 1];
        int sumneed = 0, maxneed = 0; int *need = malloc(sizeof(int) * nH);
        for (int i = 0; i < nH; i++) {
            maxred(c, H[i], r, red);
            int k = 0; while (k <= r && gl[H[i]] - red[k] >= T) k++;
            need[i] = k; sumneed += k; if (k > maxneed) maxneed = k;
            needg[H[i]] = k;
        }
        int prune = maxneed > r;
        if (!prune) {
            /* experts held by GPUs of H: a change touches at most 1 + that many of them */
            int *hc = calloc(E, sizeof(int)), best_hc = 0;
            for (int i = 0; i < nH; i++)
                for (int a = 0; a < S; a++) {
                    int e = c->slot_exp[H[i] * S + a], dup = 0;
                    for (int b = 0; b < a; b++) dup |= c->slot_exp[H[i] * S + b] == e;
                    if (!dup && ++hc[e] > best_hc) best_hc = hc[e];
                }
            free(hc);
            sumneed_all = sumneed;
            if (sumneed > r * (1 + best_hc)) prune = 1;
        }
        if (!prune) {
            for (int i = 0; i < nH; i++) if (need[i] == r) U[nU++] = H[i];
            if (nU == 0) { int h = H[0]; for (int i = 1; i < nH; i++) if (gl[H[i]] > gl[h]) h = H[i]; U[nU++] = h; fallback = 1; }
        }
        free(need);
        if (prune) { free(gl); free(H); free(U); free(cs); free(ce_); free(needg); return; }
        /* changes touching every GPU of U. When the needs of H add up to more than r, some
         * change touches two GPUs of H (filtered below); that change need not touch the
         * hottest GPU, so then U is all of H, taken as a union (changes touching any of it),
         * unless some GPUs need all r changes (every change touches those: U stays them). */
        int unite = fallback && sumneed_all > r && nH >= 2;
        if (unite) { nU = nH; for (int i = 0; i < nH; i++) U[i] = H[i]; }
        int *hcU = calloc(E, sizeof(int));
        unsigned char *inU = calloc(G, 1);
        count_holders(c, U, nU, hcU, inU);
        for (int i = 0; i < nU; i++) {
            int g = U[i];
            for (int a = 0; a < S; a++) {
                int s = g * S + a;
                if (c->changed[s]) continue;
                for (int e = 0; e < E; e++) {
                    if (e == c->slot_exp[s]) continue;
                    if (!unite && hcU[e] - gpu_holds(c, g, e) != nU - 1) continue;
                    cs[n] = s; ce_[n] = e; n++;
                }
            }
        }
        for (int e = 0; e < E; e++) {
            if (unite ? hcU[e] < 1 : hcU[e] != nU) continue;
            for (int s = 0; s < P; s++) {
                if (c->changed[s] || inU[s / S] || c->slot_exp[s] == e) continue;
                cs[n] = s; ce_[n] = e; n++;
            }
        }
        free(hcU); free(inU);
        if (sumneed_all > r && nH >= 2) {
            /* the needs add up to more than r: some change touches two GPUs of H; branch on it */
            int *hcH = calloc(E, sizeof(int));
            unsigned char *inH = calloc(G, 1);
            count_holders(c, H, nH, hcH, inH);
            int k = 0;
            for (int i = 0; i < n; i++) {
                int g = cs[i] / S, e = ce_[i], t = hcH[e];
                if (inH[g]) t += !gpu_holds(c, g, e);
                if (t >= 2) { cs[k] = cs[i]; ce_[k] = ce_[i]; k++; }
            }
            n = k;
            free(hcH); free(inH);
        }
        if (nmiss == r) { /* every remaining change writes a missing expert */
            int k = 0;
            for (int i = 0; i < n; i++) if (c->cnt[ce_[i]] == 0) { cs[k] = cs[i]; ce_[k] = ce_[i]; k++; }
            n = k;
        }
    }
    free(U);
    if (n == 0) { free(gl); free(cs); free(ce_); free(H); free(needg); return; }
    /* holder lists and the GPUs in descending load */
    int *head = malloc(sizeof(int) * E), *next = malloc(sizeof(int) * P), *ord = malloc(sizeof(int) * G);
    for (int e = 0; e < E; e++) head[e] = -1;
    for (int s = P - 1; s >= 0; s--) { next[s] = head[c->slot_exp[s]]; head[c->slot_exp[s]] = s; }
    for (int g = 0; g < G; g++) ord[g] = g;
    g_gl = gl; qsort(ord, G, sizeof(int), cmp_gl_desc);
    double *cm = malloc(sizeof(double) * n);
    int *valid = malloc(sizeof(int) * n);
    for (int i = 0; i < n; i++) {
        cm[i] = eval_change(c, gl, ord, head, next, cs[i], ce_[i], nmiss, &valid[i]);
        if (r >= 2 && nmiss - (c->cnt[ce_[i]] == 0) + (c->cnt[c->slot_exp[cs[i]]] == 1) > r - 1) { cm[i] = INFINITY; continue; }
        if (r >= 2 && nH > 0) {
            /* the child must be fixable with r - 1 changes: every GPU of H it leaves untouched
             * keeps its load and its bound (need <= r - 1), and r - 1 changes must touch all
             * its GPUs at or above T (each touches at most 1 + hc of them, hc bounded by the
             * parent's count plus the touched GPUs now hot plus one for the written slot). */
            int j = r - 1, sum_need = 0, bad = 0, overflow = 0;
            for (int q = 0; q < nH; q++) {
                int g = H[q];
                if (c->mark[g] == c->stamp) continue;
                sum_need += needg[g];
                if (needg[g] > j) { bad = 1; break; }
            }
            if (!bad) {
                /* in the child's state: the exact need of the touched GPUs now hot, and how many
                 * hot GPUs one change can touch (1 + the most of them holding one expert) */
                int hot[64], nhot = 0, old;
                for (int q = 0; q < nH; q++) if (c->mark[H[q]] != c->stamp) { if (nhot < 64) hot[nhot++] = H[q]; else overflow = 1; }
                double tl[1024]; int tg[1024], ntt = g_nt;
                for (int q = 0; q < ntt; q++) { tg[q] = g_touched[q]; tl[q] = gl[tg[q]] + c->dl[tg[q]]; }
                apply(c, cs[i], ce_[i], &old);
                double red[KMAX + 1];
                for (int q = 0; q < ntt && !bad; q++) {
                    if (tl[q] < T) continue;
                    maxred(c, tg[q], j, red);
                    int k = 0; while (k <= j && tl[q] - red[k] >= T) k++;
                    if (k > j) bad = 1;
                    sum_need += k;
                    if (nhot < 64) hot[nhot++] = tg[q]; else overflow = 1;
                }
                if (!bad && !overflow && nhot < 64) {
                    int best_hc = 1;
                    for (int q = 0; q < nhot; q++)
                        for (int a = 0; a < S; a++) {
                            int e = c->slot_exp[hot[q] * S + a], h = 0;
                            for (int q2 = 0; q2 < nhot; q2++) {
                                int has = 0;
                                for (int b = 0; b < S; b++) has |= c->slot_exp[hot[q2] * S + b] == e;
                                h += has;
                            }
                            if (h > best_hc) best_hc = h;
                        }
                    if (sum_need > j * (1 + best_hc)) bad = 1;
                }
                undo(c, cs[i], ce_[i], old);
            }
            if (bad) cm[i] = INFINITY;
        }
    }
    free(H); free(needg);
    if (r == 1) {
        for (int i = 0; i < n && !c->stop; i++) {
            if (!valid[i] || cm[i] >= c->best - c->delta) continue;
            int old; apply(c, cs[i], ce_[i], &old);
            c->sol[c->nsol][0] = cs[i]; c->sol[c->nsol][1] = ce_[i]; c->nsol++;
            double *g2 = malloc(sizeof(double) * G); gpu_loads(c, g2);
            double m2 = -INFINITY; for (int g = 0; g < G; g++) if (g2[g] > m2) m2 = g2[g];
            free(g2);
            if (m2 < c->best - c->delta) record(c, m2);
            c->nsol--; undo(c, cs[i], ce_[i], old);
        }
    } else {
        int *idx = malloc(sizeof(int) * n);
        for (int i = 0; i < n; i++) idx[i] = i;
        g_sortkey = cm; qsort(idx, n, sizeof(int), cmp_key);
        for (int ii = 0; ii < n && !c->stop; ii++) {
            int i = idx[ii], old;
            if (cm[i] == INFINITY) break;
            apply(c, cs[i], ce_[i], &old);
            c->sol[c->nsol][0] = cs[i]; c->sol[c->nsol][1] = ce_[i]; c->nsol++;
            node(c, r - 1);
            c->nsol--; undo(c, cs[i], ce_[i], old);
        }
        free(idx);
    }
    free(cm); free(valid); free(head); free(next); free(ord); free(gl); free(cs); free(ce_);
}

/* M_out[k], sol_out[k][i][2] (k = 0..K, i < k; -1 padded), exact_out[k] (1 exact, 0 not),
 * nodes_out[k]. floors[k]: a known lower bound on the max load with k changes. */
int exact_layer(int E, int P, int G, const double *load, const int *cur, int K, const double *floors,
                double delta, double slack, long long limit, double *M_out, int *sol_out,
                int *exact_out, long long *nodes_out) {
    if (K >= KMAX || P % G || G > 1024) return -1;
    Ctx c; memset(&c, 0, sizeof(c));
    c.E = E; c.P = P; c.G = G; c.S = P / G; c.load = load; c.delta = delta; c.slack = slack;
    if (c.S > 16) return -1;
    c.slot_exp = malloc(sizeof(int) * P); memcpy(c.slot_exp, cur, sizeof(int) * P);
    c.cnt = calloc(E, sizeof(int)); for (int s = 0; s < P; s++) c.cnt[cur[s]]++;
    c.changed = calloc(P, 1);
    c.dl = calloc(G, sizeof(double)); c.mark = calloc(G, sizeof(int));
    double *gl = malloc(sizeof(double) * G); gpu_loads(&c, gl);
    double M0 = -INFINITY; for (int g = 0; g < G; g++) if (gl[g] > M0) M0 = gl[g];
    free(gl);
    for (int i = 0; i < (K + 1) * K * 2; i++) sol_out[i] = -1;
    M_out[0] = M0; exact_out[0] = 1; nodes_out[0] = 0;
    int prev[KMAX][2], nprev = 0;
    for (int k = 1; k <= K; k++) {
        c.best = M_out[k - 1]; c.nbest = nprev; memcpy(c.best_sol, prev, sizeof(prev));
        c.floor_ = floors[k]; c.stop = 0; c.nodes = 0; c.limit = limit;
        if (c.best <= c.floor_ + c.delta) c.stop = 1;
        /* seed: the best single change on top of the k - 1 optimum */
        int olds[KMAX];
        for (int i = 0; i < nprev; i++) apply(&c, prev[i][0], prev[i][1], &olds[i]);
        c.nsol = nprev; memcpy(c.sol, prev, sizeof(prev));
        node(&c, 1);
        for (int i = nprev - 1; i >= 0; i--) undo(&c, prev[i][0], prev[i][1], olds[i]);
        c.nsol = 0;
        if (c.stop == 2) c.stop = 0; /* the seed's nodes do not count against exactness */
        c.nodes = 0;
        node(&c, k);
        M_out[k] = c.best; exact_out[k] = c.stop != 2; nodes_out[k] = c.nodes;
        for (int i = 0; i < c.nbest; i++) {
            sol_out[(k * K + i) * 2] = c.best_sol[i][0]; sol_out[(k * K + i) * 2 + 1] = c.best_sol[i][1];
        }
        nprev = c.nbest; memcpy(prev, c.best_sol, sizeof(prev));
        if (c.stop == 2) { for (int kk = k + 1; kk <= K; kk++) { M_out[kk] = c.best; exact_out[kk] = 0; nodes_out[kk] = 0; } break; }
    }
    free(c.slot_exp); free(c.cnt); free(c.changed); free(c.dl); free(c.mark);
    return 0;
}
