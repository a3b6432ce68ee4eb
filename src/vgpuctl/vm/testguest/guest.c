/*
 * vgpuctl test guest: a tiny bare-metal program for QEMU's "pc" machine.
 *
 * - sets a linear 32-bpp framebuffer through the Bochs VBE interface of the
 *   QEMU display device (PCI 1234:1111: "-vga std", "-device VGA" or
 *   "-device bochs-display"), at the resolution given on the multiboot command
 *   line ("mode=WIDTHxHEIGHT") or the one compiled in (TG_DEFAULT_WIDTH/HEIGHT);
 * - draws a gradient with a bar that moves with time (PIT at 100 Hz), so two
 *   screenshots a moment apart differ; or, with "anim=full" on the command
 *   line, a pattern that scrolls diagonally over the whole screen, so every
 *   row changes in every frame, at "fps=N" frames per second (default 60, at
 *   most 100: frames are paced by the PIT tick; as fast as it can when drawing
 *   a frame takes longer than that);
 * - polls the PS/2 keyboard: every key press switches the colour scheme
 *   (blue, red, green background, in turn; the scheme's channel dominates
 *   every background pixel, so any row shows the scheme: with anim=full, the
 *   whole screen is background);
 * - polls the ACPI power button status (QEMU "system_powerdown") and then
 *   powers off by writing SLP_TYP(S5)|SLP_EN to PM1a_CNT, so QEMU exits;
 * - reports on QEMU's isa-debugcon (port 0xe9): a line starting with
 *   "vgpuctl-test-guest ready" once the first frame is on screen, and one line
 *   per key press and on power-off; with anim=full also
 *   "vgpuctl-test-guest anim=full fps=N" after the ready line and, once a
 *   second, "vgpuctl-test-guest frames=N ms=T": N frames drawn in T ms.
 *
 * Freestanding: no libc, no libgcc (32-bit arithmetic only), paging off.
 */

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;

#ifndef TG_DEFAULT_WIDTH
#define TG_DEFAULT_WIDTH 1024
#endif
#ifndef TG_DEFAULT_HEIGHT
#define TG_DEFAULT_HEIGHT 768
#endif

#define MAX_DIM 4096
#define DEBUGCON 0xe9
#define TICK_HZ 100
#define PIT_HZ 1193182

/* ---------------------------------------------------------------- port I/O */

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outw(u16 port, u16 v) { __asm__ volatile("outw %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u16 inw(u16 port) { u16 v; __asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u32 inl(u16 port) { u32 v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port)); return v; }

/* gcc may emit calls to these even in freestanding code. */
void *memset(void *dst, int c, u32 n)
{
    u8 *d = dst;
    while (n--) *d++ = (u8)c;
    return dst;
}

void *memcpy(void *dst, const void *src, u32 n)
{
    u8 *d = dst;
    const u8 *s = src;
    while (n--) *d++ = *s++;
    return dst;
}

/* ------------------------------------------------------------ debug console */

static void put_str(const char *s)
{
    while (*s) outb(DEBUGCON, (u8)*s++);
}

static void put_dec(u32 v)
{
    char buf[11];
    int i = 10;
    buf[i] = 0;
    do {
        buf[--i] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    put_str(&buf[i]);
}

static void put_hex(u32 v)
{
    static const char digits[] = "0123456789abcdef";
    int shift = 28;
    put_str("0x");
    while (shift > 0 && !((v >> shift) & 0xf)) shift -= 4;
    for (; shift >= 0; shift -= 4) outb(DEBUGCON, (u8)digits[(v >> shift) & 0xf]);
}

/* ------------------------------------------------------------- interrupts */

struct idt_entry {
    u16 off_lo;
    u16 sel;
    u8 zero;
    u8 type;
    u16 off_hi;
} __attribute__((packed));

struct idt_ptr {
    u16 limit;
    u32 base;
} __attribute__((packed));

extern void irq_timer_stub(void);
extern void irq_ignore_stub(void);
extern void (*const exc_stubs[32])(void);

static struct idt_entry idt[256];
static volatile u32 ticks;

void on_timer_irq(void)
{
    ticks++;
    outb(0x20, 0x20); /* EOI to the master PIC */
}

void on_exception(u32 vector)
{
    put_str("vgpuctl-test-guest exception ");
    put_dec(vector);
    put_str("\n");
    for (;;) __asm__ volatile("cli; hlt");
}

static void idt_set(int n, void (*handler)(void))
{
    u32 a = (u32)handler;
    idt[n].off_lo = (u16)(a & 0xffff);
    idt[n].sel = 0x08;
    idt[n].zero = 0;
    idt[n].type = 0x8e; /* present, ring 0, 32-bit interrupt gate */
    idt[n].off_hi = (u16)(a >> 16);
}

static void setup_interrupts(void)
{
    struct idt_ptr p;
    int i;
    u32 divisor = (PIT_HZ + TICK_HZ / 2) / TICK_HZ;

    for (i = 0; i < 32; i++) idt_set(i, exc_stubs[i]);
    for (i = 32; i < 256; i++) idt_set(i, irq_ignore_stub);
    idt_set(0x20, irq_timer_stub);
    p.limit = sizeof(idt) - 1;
    p.base = (u32)idt;
    __asm__ volatile("lidt %0" : : "m"(p));

    /* Remap the 8259 PICs to vectors 0x20..0x2f; unmask only IRQ0 (the PIT). */
    outb(0x20, 0x11);
    outb(0xa0, 0x11);
    outb(0x21, 0x20);
    outb(0xa1, 0x28);
    outb(0x21, 0x04);
    outb(0xa1, 0x02);
    outb(0x21, 0x01);
    outb(0xa1, 0x01);
    outb(0x21, 0xfe);
    outb(0xa1, 0xff);

    /* PIT channel 0, rate generator, TICK_HZ. */
    outb(0x43, 0x34);
    outb(0x40, (u8)(divisor & 0xff));
    outb(0x40, (u8)(divisor >> 8));
}

/* -------------------------------------------------------------------- PCI */

static u32 pci_addr(u32 bus, u32 dev, u32 fn, u32 off)
{
    return 0x80000000u | (bus << 16) | (dev << 11) | (fn << 8) | (off & 0xfc);
}

static u32 pci_read32(u32 bus, u32 dev, u32 fn, u32 off)
{
    outl(0xcf8, pci_addr(bus, dev, fn, off));
    return inl(0xcfc);
}

static void pci_write32(u32 bus, u32 dev, u32 fn, u32 off, u32 v)
{
    outl(0xcf8, pci_addr(bus, dev, fn, off));
    outl(0xcfc, v);
}

struct pci_loc {
    u32 bus, dev, fn;
    int found;
};

static struct pci_loc pci_find(u16 vendor, u16 device)
{
    struct pci_loc loc = {0, 0, 0, 0};
    u32 bus, dev, fn;
    for (bus = 0; bus < 4; bus++) {
        for (dev = 0; dev < 32; dev++) {
            for (fn = 0; fn < 8; fn++) {
                u32 id = pci_read32(bus, dev, fn, 0);
                if ((id & 0xffff) == 0xffff) {
                    if (fn == 0) break;
                    continue;
                }
                if ((id & 0xffff) == vendor && (id >> 16) == device) {
                    loc.bus = bus;
                    loc.dev = dev;
                    loc.fn = fn;
                    loc.found = 1;
                    return loc;
                }
                /* single-function device: skip the other functions */
                if (fn == 0 && !(pci_read32(bus, dev, 0, 0x0c) & 0x00800000)) break;
            }
        }
    }
    return loc;
}

/* ------------------------------------------------------------- Bochs VBE */

#define VBE_INDEX_ID 0
#define VBE_INDEX_XRES 1
#define VBE_INDEX_YRES 2
#define VBE_INDEX_BPP 3
#define VBE_INDEX_ENABLE 4
#define VBE_INDEX_BANK 5
#define VBE_INDEX_VIRT_WIDTH 6
#define VBE_INDEX_X_OFFSET 8
#define VBE_INDEX_Y_OFFSET 9
#define VBE_INDEX_VIDEO_MEMORY_64K 0xa
#define VBE_ENABLED 0x01
#define VBE_LFB_ENABLED 0x40

static volatile u16 *vbe_mmio; /* BAR2 + 0x500, when the device has it */
static volatile u8 *vga_mmio;  /* BAR2 + 0x400: VGA ports 0x3c0..0x3df */

static void vbe_write(u16 index, u16 value)
{
    if (vbe_mmio) {
        vbe_mmio[index] = value;
    } else {
        outw(0x1ce, index);
        outw(0x1cf, value);
    }
}

static u16 vbe_read(u16 index)
{
    if (vbe_mmio) return vbe_mmio[index];
    outw(0x1ce, index);
    return inw(0x1cf);
}

static u32 *fb;
static u32 width, height, stride; /* stride in pixels */

static u32 parse_uint(const char **sp)
{
    const char *s = *sp;
    u32 v = 0;
    while (*s >= '0' && *s <= '9' && v < 100000) v = v * 10 + (u32)(*s++ - '0');
    *sp = s;
    return v;
}

/* The value of "key" (given with its '=') at the start of a word of the command line, or 0. */
static const char *cmdline_value(const char *cmdline, const char *key)
{
    const char *s = cmdline;
    if (!s) return 0;
    for (; *s; s++) {
        u32 i = 0;
        if (s != cmdline && s[-1] != ' ') continue;
        while (key[i] && s[i] == key[i]) i++;
        if (!key[i]) return s + i;
    }
    return 0;
}

/* "mode=WIDTHxHEIGHT" anywhere on the multiboot command line. */
static void mode_from_cmdline(const char *cmdline, u32 *w, u32 *h)
{
    const char *p = cmdline_value(cmdline, "mode=");
    u32 pw, ph;
    if (!p) return;
    pw = parse_uint(&p);
    if (*p != 'x' && *p != 'X') return;
    p++;
    ph = parse_uint(&p);
    if (pw >= 320 && ph >= 200 && pw <= MAX_DIM && ph <= MAX_DIM) {
        *w = pw;
        *h = ph;
    }
}

static int set_mode(u32 w, u32 h)
{
    struct pci_loc d = pci_find(0x1234, 0x1111);
    u32 bar0, bar2, cls, cmd, vram64k;
    u16 id;

    if (!d.found) {
        put_str("vgpuctl-test-guest: no Bochs display (PCI 1234:1111)\n");
        return 0;
    }
    cmd = pci_read32(d.bus, d.dev, d.fn, 0x04);
    if ((cmd & 0x3) != 0x3) pci_write32(d.bus, d.dev, d.fn, 0x04, cmd | 0x3); /* I/O + memory decode */
    cls = pci_read32(d.bus, d.dev, d.fn, 0x08) >> 16;
    bar0 = pci_read32(d.bus, d.dev, d.fn, 0x10) & 0xfffffff0u;
    bar2 = pci_read32(d.bus, d.dev, d.fn, 0x18);
    if (!(bar2 & 1) && (bar2 & 0xfffffff0u)) {
        vbe_mmio = (volatile u16 *)((bar2 & 0xfffffff0u) + 0x500);
        if (cls == 0x0300) vga_mmio = (volatile u8 *)((bar2 & 0xfffffff0u) + 0x400);
    }
    id = vbe_read(VBE_INDEX_ID);
    if ((id & 0xfff0) != 0xb0c0 || !bar0) {
        put_str("vgpuctl-test-guest: Bochs VBE not answering\n");
        return 0;
    }
    vram64k = vbe_read(VBE_INDEX_VIDEO_MEMORY_64K);
    if (vram64k && (w * h * 4 + 0xffff) / 0x10000 > vram64k) {
        put_str("vgpuctl-test-guest: mode does not fit in video memory, using 1024x768\n");
        w = 1024;
        h = 768;
    }

    vbe_write(VBE_INDEX_ENABLE, 0);
    vbe_write(VBE_INDEX_XRES, (u16)w);
    vbe_write(VBE_INDEX_YRES, (u16)h);
    vbe_write(VBE_INDEX_BPP, 32);
    vbe_write(VBE_INDEX_BANK, 0);
    vbe_write(VBE_INDEX_ENABLE, VBE_ENABLED | VBE_LFB_ENABLED);
    vbe_write(VBE_INDEX_VIRT_WIDTH, (u16)w);
    vbe_write(VBE_INDEX_X_OFFSET, 0);
    vbe_write(VBE_INDEX_Y_OFFSET, 0);

    if (cls == 0x0300) {
        /* VGA attribute controller: palette address source on (else the screen is blank). */
        if (vga_mmio) {
            (void)vga_mmio[0x3da - 0x3c0];
            vga_mmio[0] = 0x20;
        } else {
            (void)inb(0x3da);
            outb(0x3c0, 0x20);
        }
    }

    width = vbe_read(VBE_INDEX_XRES);
    height = vbe_read(VBE_INDEX_YRES);
    stride = vbe_read(VBE_INDEX_VIRT_WIDTH);
    if (width != w || height != h || stride < width) {
        put_str("vgpuctl-test-guest: display refused the mode\n");
        return 0;
    }
    fb = (u32 *)bar0;
    return 1;
}

/* ---------------------------------------------------------------- drawing */

/* anim=full: a triangle wave across (period COL_PERIOD px) and down (ROW_PERIOD rows), scrolled by
   STEP_X and STEP_Y px a frame; the tables hold one period more than the screen, so a frame at phase
   (ox, oy) reads col_part[x + ox] and row_part[y + oy]: no division or wrap-around per pixel. */
#define COL_PERIOD 256
#define ROW_PERIOD 128
#define STEP_X 4
#define STEP_Y 2

static u32 col_part[MAX_DIM + COL_PERIOD], row_part[MAX_DIM + ROW_PERIOD];
static u32 scheme;
static u32 bar_pos, bar_width, bar_speed, bar_colour;
static u32 last_tick;
static int anim_full;
static u32 fps = 60, frame_credit, phase, frames;

#define NSCHEMES 3

static u32 rgb(u32 r, u32 g, u32 b) { return (r << 16) | (g << 8) | b; }

/* background(x, y) = col_part[x] | row_part[y]: the channels never overlap, and the scheme's own
   channel (128..255) always outweighs the other two (0..63 each). */
static void build_scheme(void)
{
    u32 x, y;
    u32 cols = anim_full ? width + COL_PERIOD : width, rows = anim_full ? height + ROW_PERIOD : height;
    for (x = 0; x < cols; x++) {
        u32 t = x & (COL_PERIOD - 1);
        u32 a = anim_full ? (t < COL_PERIOD / 2 ? 2 * t : 2 * (COL_PERIOD - 1 - t)) : x * 255 / (width - 1);
        switch (scheme) {
        case 0: col_part[x] = rgb(a / 4, 0, 128 + a / 2); break; /* blue */
        case 1: col_part[x] = rgb(128 + a / 2, 0, a / 4); break; /* red */
        default: col_part[x] = rgb(a / 4, 128 + a / 2, 0); break; /* green */
        }
    }
    for (y = 0; y < rows; y++) {
        u32 t = y & (ROW_PERIOD - 1);
        u32 b = anim_full ? (t < ROW_PERIOD / 2 ? t : ROW_PERIOD - 1 - t) : y * 255 / (height - 1) / 4;
        switch (scheme) {
        case 0: row_part[y] = rgb(0, b, 0); break;
        case 1: row_part[y] = rgb(0, b, 0); break;
        default: row_part[y] = rgb(0, 0, b); break;
        }
    }
    switch (scheme) {
    case 0: bar_colour = rgb(255, 224, 0); break;   /* yellow on blue */
    case 1: bar_colour = rgb(0, 224, 255); break;   /* cyan on red */
    default: bar_colour = rgb(255, 0, 224); break;  /* magenta on green */
    }
}

static int in_bar(u32 x, u32 pos) { return (x + width - pos) % width < bar_width; }

static void draw_column(u32 x, int bar)
{
    u32 *p = fb + x;
    u32 y;
    if (bar) {
        for (y = 0; y < height; y++, p += stride) *p = bar_colour;
    } else {
        u32 c = col_part[x];
        for (y = 0; y < height; y++, p += stride) *p = c | row_part[y];
    }
}

static void draw_full(void)
{
    u32 x, y, i;
    for (y = 0; y < height; y++) {
        u32 *row = fb + y * stride;
        u32 r = row_part[y];
        for (x = 0; x < width; x++) row[x] = col_part[x] | r;
    }
    for (i = 0; i < bar_width; i++) draw_column((bar_pos + i) % width, 1);
}

/* One frame of anim=full at the current phase, row by row in whole 32-bit words. Interrupts are on
   meanwhile: a frame may take longer than a tick under TCG, and the ticks must still be counted. */
static void draw_frame_full(void)
{
    u32 ox = (phase * STEP_X) & (COL_PERIOD - 1), oy = (phase * STEP_Y) & (ROW_PERIOD - 1), x, y;
    const u32 *cols = col_part + ox;
    __asm__ volatile("sti" ::: "memory");
    for (y = 0; y < height; y++) {
        u32 *row = fb + y * stride;
        u32 r = row_part[y + oy];
        for (x = 0; x < width; x++) row[x] = cols[x] | r;
    }
    __asm__ volatile("cli" ::: "memory");
    frames++;
}

/* anim=full: whether the next frame is due. Each tick earns fps credits, a frame costs TICK_HZ; at
   most one frame's worth is kept, so a guest that cannot keep up draws back to back, never a backlog. */
static int full_frame_due(u32 now)
{
    u32 elapsed = now - last_tick;
    last_tick = now;
    if (elapsed > TICK_HZ) elapsed = TICK_HZ;
    frame_credit += elapsed * fps;
    if (frame_credit < TICK_HZ) return 0;
    frame_credit -= TICK_HZ;
    if (frame_credit > TICK_HZ) frame_credit = TICK_HZ;
    return 1;
}

static void animate(u32 now)
{
    u32 elapsed = now - last_tick, new_pos, i;
    last_tick = now;
    if (!fb || !elapsed) return;
    new_pos = (bar_pos + (elapsed % width) * bar_speed) % width;
    for (i = 0; i < bar_width; i++) {
        u32 x = (bar_pos + i) % width;
        if (!in_bar(x, new_pos)) draw_column(x, 0);
    }
    for (i = 0; i < bar_width; i++) {
        u32 x = (new_pos + i) % width;
        if (!in_bar(x, bar_pos)) draw_column(x, 1);
    }
    bar_pos = new_pos;
}

/* --------------------------------------------------------------- keyboard */

static void kbc_wait_write(void)
{
    u32 n;
    for (n = 0; n < 100000 && (inb(0x64) & 0x02); n++) {}
}

static void kbc_drain(void)
{
    u32 n;
    for (n = 0; n < 64 && (inb(0x64) & 0x01); n++) (void)inb(0x60);
}

static void setup_keyboard(void)
{
    u8 ccb;
    u32 n;
    kbc_drain();
    kbc_wait_write();
    outb(0x64, 0x20); /* read the controller command byte */
    for (n = 0; n < 100000 && !(inb(0x64) & 0x01); n++) {}
    ccb = inb(0x60);
    /* translation to set 1 on, keyboard clock on, mouse off, no IRQs (we poll) */
    ccb = (u8)((ccb | 0x40 | 0x20) & ~(0x10 | 0x02 | 0x01));
    kbc_wait_write();
    outb(0x64, 0x60);
    kbc_wait_write();
    outb(0x60, ccb);
    kbc_wait_write();
    outb(0x60, 0xf4); /* keyboard: enable scanning (answers 0xfa, ignored) */
    for (n = 0; n < 100000 && !(inb(0x64) & 0x01); n++) {}
    kbc_drain();
}

static void poll_keyboard(void)
{
    u32 n;
    for (n = 0; n < 32; n++) {
        u8 st = inb(0x64), code;
        if (!(st & 0x01)) return;
        code = inb(0x60);
        if (st & 0x20) continue;   /* mouse byte */
        if (code & 0x80) continue; /* release, 0xe0/0xe1 prefix, ack */
        scheme = (scheme + 1) % NSCHEMES;
        if (fb) {
            build_scheme();
            if (anim_full) draw_frame_full();
            else draw_full();
        }
        put_str("vgpuctl-test-guest key scancode=");
        put_hex(code);
        put_str(" scheme=");
        put_dec(scheme);
        put_str("\n");
    }
}

/* ------------------------------------------------------------------- ACPI */

static u16 pm1a_evt, pm1a_cnt, pm1_en_off = 2;
static u32 s5_slp_typ; /* QEMU's pc/q35 DSDT: \_S5 = Package {0, 0, 0, 0} */

static int sig_is(const u8 *p, const char *sig, u32 n)
{
    u32 i;
    for (i = 0; i < n; i++)
        if (p[i] != (u8)sig[i]) return 0;
    return 1;
}

static const u8 *find_rsdp(void)
{
    const volatile u16 *bda_ebda;
    u32 ebda, a;
    /* launder the address: gcc warns about dereferencing small constants */
    __asm__("" : "=r"(bda_ebda) : "0"(0x40eu));
    ebda = (u32)*bda_ebda << 4;
    if (ebda >= 0x80000 && ebda < 0xa0000)
        for (a = ebda; a < ebda + 1024; a += 16)
            if (sig_is((const u8 *)a, "RSD PTR ", 8)) return (const u8 *)a;
    for (a = 0xe0000; a < 0x100000; a += 16)
        if (sig_is((const u8 *)a, "RSD PTR ", 8)) return (const u8 *)a;
    return 0;
}

static u32 rd32(const u8 *p) { return (u32)p[0] | ((u32)p[1] << 8) | ((u32)p[2] << 16) | ((u32)p[3] << 24); }

/* \_S5 in the DSDT: NameOp "_S5_" PackageOp PkgLength NumElements SLP_TYPa ... */
static void s5_from_dsdt(const u8 *dsdt)
{
    u32 len = rd32(dsdt + 4), i;
    if (!sig_is(dsdt, "DSDT", 4) || len < 40 || len > 0x100000) return;
    for (i = 36; i + 10 < len; i++) {
        const u8 *p = dsdt + i;
        if (!sig_is(p, "_S5_", 4) || p[4] != 0x12) continue;
        p += 5;
        p += 1 + (*p >> 6); /* PkgLength */
        p += 1;             /* NumElements */
        if (*p == 0x0a) s5_slp_typ = p[1];     /* BytePrefix */
        else if (*p == 0x00 || *p == 0x01) s5_slp_typ = *p; /* ZeroOp / OneOp */
        return;
    }
}

static void setup_acpi(void)
{
    const u8 *rsdp = find_rsdp();
    u32 smi_cmd = 0, acpi_enable = 0;

    if (rsdp) {
        const u8 *rsdt = (const u8 *)rd32(rsdp + 16);
        u32 n = (rd32(rsdt + 4) - 36) / 4, i;
        for (i = 0; sig_is(rsdt, "RSDT", 4) && i < n; i++) {
            const u8 *t = (const u8 *)rd32(rsdt + 36 + 4 * i);
            if (!sig_is(t, "FACP", 4)) continue;
            s5_from_dsdt((const u8 *)rd32(t + 40));
            smi_cmd = rd32(t + 48);
            acpi_enable = t[52];
            pm1a_evt = (u16)rd32(t + 56);
            pm1a_cnt = (u16)rd32(t + 64);
            if (t[88] >= 4) pm1_en_off = t[88] / 2;
            break;
        }
    }
    if (!pm1a_evt || !pm1a_cnt) {
        /* No FADT: the PIIX4 power management function's PMBA (config 0x40). */
        struct pci_loc pm = pci_find(0x8086, 0x7113);
        if (pm.found) {
            u32 base = pci_read32(pm.bus, pm.dev, pm.fn, 0x40) & 0xffc0;
            if (base) {
                u32 misc = pci_read32(pm.bus, pm.dev, pm.fn, 0x80);
                if (!(misc & 1)) pci_write32(pm.bus, pm.dev, pm.fn, 0x80, misc | 1); /* PMIOSE */
                pm1a_evt = (u16)base;
                pm1a_cnt = (u16)(base + 4);
            }
        }
    }
    if (!pm1a_evt || !pm1a_cnt) {
        put_str("vgpuctl-test-guest: no ACPI PM1 registers, power button ignored\n");
        return;
    }
    if (smi_cmd && acpi_enable && !(inw(pm1a_cnt) & 1)) {
        u32 n;
        outb((u16)smi_cmd, (u8)acpi_enable); /* into ACPI mode (SCI_EN) */
        for (n = 0; n < 100000 && !(inw(pm1a_cnt) & 1); n++) {}
    }
    outw(pm1a_evt, 1u << 8);                                         /* clear PWRBTN_STS */
    outw((u16)(pm1a_evt + pm1_en_off), (u16)(inw((u16)(pm1a_evt + pm1_en_off)) | (1u << 8))); /* PWRBTN_EN */
}

static void poll_power_button(void)
{
    if (!pm1a_evt || !(inw(pm1a_evt) & (1u << 8))) return;
    outw(pm1a_evt, 1u << 8);
    put_str("vgpuctl-test-guest power button: powering off\n");
    outw(pm1a_cnt, (u16)((s5_slp_typ & 7) << 10 | (1u << 13))); /* SLP_TYP | SLP_EN */
    /* QEMU acts on the request asynchronously: wait a while before giving up. */
    {
        u32 start = ticks;
        while (ticks - start < 2 * TICK_HZ) __asm__ volatile("sti; hlt; cli" ::: "memory");
    }
    put_str("vgpuctl-test-guest: power-off did not happen\n");
    for (;;) __asm__ volatile("cli; hlt");
}

/* ------------------------------------------------------------------- main */

void guest_main(u32 magic, const u32 *mbi)
{
    u32 w = TG_DEFAULT_WIDTH, h = TG_DEFAULT_HEIGHT;
    const char *cmdline = 0;

    if (magic == 0x2badb002 && mbi && (mbi[0] & (1u << 2))) cmdline = (const char *)mbi[4];
    mode_from_cmdline(cmdline, &w, &h);
    {
        const char *v = cmdline_value(cmdline, "anim=");
        anim_full = v && v[0] == 'f' && v[1] == 'u' && v[2] == 'l' && v[3] == 'l' && (!v[4] || v[4] == ' ');
        v = cmdline_value(cmdline, "fps=");
        if (v) {
            u32 n = parse_uint(&v);
            if (n) fps = n < TICK_HZ ? n : TICK_HZ;
        }
    }

    setup_interrupts();
    setup_keyboard();
    setup_acpi();

    if (set_mode(w, h)) {
        bar_width = width / 20 ? width / 20 : 1;
        bar_speed = width / 256 ? width / 256 : 1;
        build_scheme();
        if (anim_full) draw_frame_full();
        else draw_full();
    }

    put_str("vgpuctl-test-guest ready mode=");
    put_dec(width);
    put_str("x");
    put_dec(height);
    put_str(" fb=");
    put_hex((u32)fb);
    put_str(" pm1a_cnt=");
    put_hex(pm1a_cnt);
    put_str(" s5=");
    put_dec(s5_slp_typ);
    put_str("\n");
    if (anim_full) {
        put_str("vgpuctl-test-guest anim=full fps=");
        put_dec(fps);
        put_str("\n");
    }

    last_tick = ticks;
    {
        u32 report_tick = ticks;
        for (;;) {
            poll_keyboard();
            poll_power_button();
            if (anim_full && fb) {
                u32 now = ticks;
                if (now - report_tick >= TICK_HZ) {
                    put_str("vgpuctl-test-guest frames=");
                    put_dec(frames);
                    put_str(" ms=");
                    put_dec((now - report_tick) * (1000 / TICK_HZ));
                    put_str("\n");
                    frames = 0;
                    report_tick = now;
                }
                if (full_frame_due(now)) {
                    phase++;
                    draw_frame_full();
                    continue; /* behind: the next one may be due already (ticks counted meanwhile) */
                }
            } else {
                animate(ticks);
            }
            __asm__ volatile("sti; hlt; cli" ::: "memory");
        }
    }
}
