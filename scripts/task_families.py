"""Task families, the data behind data/ (built by scripts/build_data.py): prompts (zh/en),
reference code, bugs, test inputs.

A family is one kind of task with parameter variants. Templates use string.Template:
$name is the function name, other $fields come from the parameter dict. A prompt template
without $name relies on the convention name (the family's first name). `inputs(rng, p)`
returns argument tuples (edge cases first); `oracle(p, *args)` computes the expected value
independently of the reference code, so a wrong reference is caught by the sandbox check, and
raises ValueError (`valid`) for an input the task is not for. The last third of each family's
parameter list (or its last `heldout`) is held out of every training file (SFT, RM, PPO), split
between eval and validation; a family with natural prompts (`bare`) keeps params[0] out of them too.
The inputs are what the tests call: build_data stops unless they reject every bug of the family,
every other variant's reference and the mutants of the reference that change what it returns.

A family whose variants differ by one value (a number, a character, a word, peg names) has many
seen values around its held-out ones (sum_multiples: 40 seen k, 8 held out), so that writing a
held-out value is a matter of copying it from the prompt, not of memory; with a few seen values
the model wrote one of those instead (docs/RESULTS.md, "Values read from the prompt").
"""
import functools
import math
import string
from dataclasses import dataclass, field


@dataclass
class Family:
    name: str
    params: list          # list of dicts; the last `len // 3` (or `heldout`) are held out
    names: list           # function names ($fields allowed); names[0] is the convention
    en: list              # prompt templates
    zh: list
    code: str             # reference solution template
    bugs: dict            # bug kind -> wrong solution template
    inputs: object        # (rng, p) -> list of argument tuples
    oracle: object        # (p, *args) -> expected value
    setup: str = ""       # code prepended before the program (tests construct its objects)
    call: object = None   # optional (name, args) -> call expression; default name(*args)
    heldout: int = field(default=-1)  # how many trailing params are held out (-1: len // 3)
    bare: list = field(default_factory=list)  # (lang, natural prompt) meaning params[0], names[0]
    behaviour: object = None  # optional p -> key: variants with one key ask for the same results (bubble
    #   vs insertion sort, which only the method tells apart): one task for evaluation, held out together

    def task_class(self, pi):
        """The evaluation task of variant pi: variants that only a method tells apart share one."""
        return pi if self.behaviour is None else self.behaviour(self.params[pi])

    @property
    def n_seen(self):
        """How many leading params the training files may hold; params[n_seen:] are held out
        (scripts/build_data.py variant_roles: also params[0] of a family with natural prompts)."""
        return len(self.params) - (len(self.params) // 3 if self.heldout < 0 else self.heldout)


def fill(template, p, name):
    """Substitute until no $field is left (a parameter may itself hold a template)."""
    for _ in range(4):
        if "$" not in template:
            break
        template = string.Template(template).substitute(p, name=name)
    return template


def seen_then_held(values, is_held):
    """Values in order, the held-out ones (is_held) last: the Family.params order it expects."""
    return [v for v in values if not is_held(v)] + [v for v in values if is_held(v)]


def held_last(params, is_held):
    """Order params so the held-out ones (is_held) come last; returns (params, how many held)."""
    return sorted(params, key=is_held), sum(map(is_held, params))


def valid(ok):
    """None, or ValueError when an oracle is asked about an input its task is not for (an unsorted
    list to merge, 0 as a Roman numeral): the checks of scripts/build_data.py probe a reference with
    other variants' inputs and inputs near its tests, and skip those."""
    if not ok:
        raise ValueError("not an input of this task")


# ---------------------------------------------------------------- input helpers
def ints(rng, n=None, lo=-20, hi=20):
    return [rng.randint(lo, hi) for _ in range(rng.randint(1, 8) if n is None else n)]


def lists(rng, extra=(), lo=-20, hi=20):
    """Edge cases (empty, one element, negatives, duplicates) then random lists."""
    base = [([],), ([0],), ([-3, -1, -2],), ([5, 5, 2, 2, 9],)] + [(x,) for x in extra]
    return base + [(ints(rng, lo=lo, hi=hi),) for _ in range(3)]


WORDS = ["apple", "level", "banana", "Radar", "sky", "tree", "moon", "data", "noon", "code",
         "hello", "world", "river", "stone", "light", "Anna", "python", "queue", "civic", "zebra"]


def sentence(rng, n=None):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 5) if n is None else n))


def strings(rng, extra=()):
    return [("",), ("a",), ("Hello World",)] + [(x,) for x in extra] + [(sentence(rng),) for _ in range(3)]


FILTERS = [  # (code with x, en, zh)
    ("x % 2 == 0", "even", "偶数"), ("x % 2 != 0", "odd", "奇数"), ("x > 0", "positive", "正数"),
    ("x < 0", "negative", "负数"), ("x % 3 == 0", "divisible by 3", "能被3整除的数"),
    ("x > 10", "greater than 10", "大于10的数"),
]
MAPS = [
    ("x * x", "the square of", "平方"), ("x * 2", "double", "两倍"), ("-x", "the negation of", "相反数"),
    ("x + 1", "one more than", "加1后的值"), ("abs(x)", "the absolute value of", "绝对值"),
    ("x * 3", "triple", "三倍"),
]
AGGS = [  # (code over vals, en, zh, python oracle)
    ("sum(vals)", "the sum", "总和", sum), ("len(vals)", "the count", "个数", len),
    ("max(vals) if vals else None", "the maximum (None if there is none)", "最大值（没有则返回None）",
     lambda v: max(v) if v else None),
    ("min(vals) if vals else None", "the minimum (None if there is none)", "最小值（没有则返回None）",
     lambda v: min(v) if v else None),
]


def fx(code):
    return eval("lambda x: " + code)  # our own constant templates above, never user input


TREE = """class TreeNode:
    def __init__(self, val, left=None, right=None):
        self.val = val
        self.left = left
        self.right = right
"""
TREES = [  # (expression building the tree, nested (val, left, right) tuple for the oracle)
    "None", "TreeNode(1)", "TreeNode(2, TreeNode(1), TreeNode(3))",
    "TreeNode(5, TreeNode(3, TreeNode(2), TreeNode(4)), TreeNode(8, None, TreeNode(9)))",
    "TreeNode(1, TreeNode(2, TreeNode(3, TreeNode(4))))",
    "TreeNode(-1, None, TreeNode(7, TreeNode(6), None))",
]


class _T:  # oracle-side tree built from the same expressions
    def __init__(self, val, left=None, right=None):
        self.val, self.left, self.right = val, left, right


def tree_of(expr):
    return eval(expr, {"TreeNode": _T})


def traverse(t, order):
    if t is None:
        return []
    if order == "level":
        out, level = [], [t]
        while level:
            out += [n.val for n in level]
            level = [c for n in level for c in (n.left, n.right) if c]
        return out
    parts = {"pre": ([t.val], traverse(t.left, order), traverse(t.right, order)),
             "in": (traverse(t.left, order), [t.val], traverse(t.right, order)),
             "post": (traverse(t.left, order), traverse(t.right, order), [t.val])}[order]
    return sum(parts, [])


def depth(t):
    return 0 if t is None else 1 + max(depth(t.left), depth(t.right))


def leaves(t):
    return 0 if t is None else 1 if not (t.left or t.right) else leaves(t.left) + leaves(t.right)


def tsum(t):
    return 0 if t is None else t.val + tsum(t.left) + tsum(t.right)


def is_prime(n):
    return n > 1 and all(n % d for d in range(2, int(n ** 0.5) + 1))


def to_base_digits(n, b):
    n, s = abs(n), 0
    while n:
        s, n = s + n % b, n // b
    return s


def rle(s, digits_first):
    out, i = "", 0
    while i < len(s):
        j = i
        while j < len(s) and s[j] == s[i]:
            j += 1
        out += f"{j - i}{s[i]}" if digits_first else f"{s[i]}{j - i}"
        i = j
    return out


def simulate(kind, ops):
    items, out = [], []
    for op in ops:
        if op[0] == "push":
            items.append(op[1])
            out.append(None)
        elif op[0] == "pop":
            out.append((items.pop() if kind == "Stack" else items.pop(0)) if items else None)
        elif op[0] == "peek":
            out.append((items[-1] if kind == "Stack" else items[0]) if items else None)
        else:
            out.append(len(items))
    return out


RUN_OPS = """def run_ops(cls, ops):
    obj, out = cls(), []
    for op in ops:
        out.append(getattr(obj, op[0])(*op[1:]))
    return out
"""


def ops_inputs(rng, p):
    fixed = [[("pop",), ("peek",), ("size",)], [("push", 1), ("push", 2), ("pop",), ("peek",), ("size",)],
             [("push", 1), ("push", 2), ("peek",), ("push", 3), ("pop",), ("peek",), ("pop",), ("size",)]]
    rand = []
    for _ in range(3):
        ops = []
        for _ in range(rng.randint(3, 9)):
            ops.append(rng.choice([("push", rng.randint(-9, 9)), ("push", rng.randint(0, 50)), ("pop",),
                                   ("peek",), ("size",)]))
        rand.append(ops)
    return [(o,) for o in fixed + rand]


def sq_matrix(rng, n):
    return [[rng.randint(-9, 9) for _ in range(n)] for _ in range(n)]


F = []  # all families, in a fixed order (the build is deterministic)

F.append(Family(
    "sum_multiples", [dict(k=k) for k in seen_then_held(range(2, 50), lambda k: k % 3 == 1 and k < 26)],
    ["sum_multiples", "total_divisible"],
    ["Write a Python function $name(nums) that returns the sum of the numbers in nums divisible by $k.",
     "Implement $name(nums): add up every element of the list nums that is a multiple of $k and return the total.",
     "Given a list of integers, return the sum of those divisible by $k. Name the function $name(nums)."],
    ["写一个Python函数 $name(nums)，返回列表 nums 中能被 $k 整除的数之和。",
     "实现函数 $name(nums)：把列表里所有 $k 的倍数加起来并返回。",
     "给定整数列表 nums，求其中能被 $k 整除的元素的和，函数名为 $name。"],
    "def $name(nums):\n    return sum(x for x in nums if x % $k == 0)",
    {"wrong_comparison": "def $name(nums):\n    return sum(x for x in nums if x % $k != 0)",
     "wrong_operator": "def $name(nums):\n    return sum(x for x in nums if x // $k == 0)"},
    lambda rng, p: lists(rng, [[p["k"], 2 * p["k"], p["k"] + 1, -p["k"]], [p["k"]], list(range(1, 100))]),
    lambda p, nums: sum(x for x in nums if x % p["k"] == 0), heldout=8))

F.append(Family(
    "count_char", [dict(c=c) for c in "aeontlsirdcmhp" + "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789" + "ubfgwyk"],
    ["count_char", "char_frequency"],
    ["Write a function $name(s) that counts how many times the character '$c' appears in the string s.",
     "Implement $name(s) returning the number of occurrences of '$c' in s (case-sensitive).",
     "How many '$c' characters are in a string? Write $name(s) in Python."],
    ["编写函数 $name(s)，统计字符串 s 中字符 '$c' 出现的次数。",
     "实现 $name(s)：返回字母 '$c' 在 s 中出现了几次（区分大小写）。",
     "用Python写一个函数 $name(s)，计算字符 '$c' 的个数。"],
    "def $name(s):\n    count = 0\n    for ch in s:\n        if ch == '$c':\n            count += 1\n    return count",
    {"missing_return": "def $name(s):\n    count = 0\n    for ch in s:\n        if ch == '$c':\n            count += 1",
     "off_by_one": "def $name(s):\n    count = 0\n    for ch in s[1:]:\n        if ch == '$c':\n            count += 1\n    return count"},
    lambda rng, p: strings(rng, [p["c"] * 3 + "x" + p["c"].upper(), p["c"] + "bc" + p["c"]]),
    lambda p, s: s.count(p["c"]), heldout=7))

F.append(Family(
    "power_sum", [dict(p=p) for p in (2, 1, 3, 4, 6, 7, 9, 5, 8)],
    ["power_sum", "sum_of_powers"],
    ["Write $name(n) that returns 1**$p + 2**$p + ... + n**$p (0 when n < 1).",
     "Implement $name(n): the sum of i to the power $p for i from 1 to n inclusive."],
    ["写函数 $name(n)，返回 1 到 n（含 n）每个数的 $p 次方之和，n 小于 1 时返回 0。",
     "实现 $name(n)：计算 1**$p + 2**$p + ... + n**$p。"],
    "def $name(n):\n    return sum(i ** $p for i in range(1, n + 1))",
    {"off_by_one": "def $name(n):\n    return sum(i ** $p for i in range(1, n))",
     "wrong_operator": "def $name(n):\n    return sum(i * $p for i in range(1, n + 1))"},
    lambda rng, p: [(0,), (1,), (2,), (-3,), (rng.randint(3, 12),), (rng.randint(5, 20),)],
    lambda p, n: sum(i ** p["p"] for i in range(1, n + 1)), heldout=2))

F.append(Family(
    "digit_sum", [dict(b=b) for b in seen_then_held((10, 2, 8, 16, 3, 4, 6, 9, 12, 15, 5, 7, 11, 13, 14) + tuple(range(17, 37)),
                                                    lambda b: b in (5, 7, 11, 13, 14, 20, 27, 33))],
    ["digit_sum", "sum_of_digits"],
    ["Write $name(n) returning the sum of the digits of abs(n) written in base $b.",
     "Implement $name(n): convert |n| to base $b and add up its digits."],
    ["编写 $name(n)，返回 abs(n) 在 $b 进制下各位数字之和。",
     "实现函数 $name(n)：把 n 的绝对值写成 $b 进制，求各位数字的和。"],
    "def $name(n):\n    n = abs(n)\n    total = 0\n    while n > 0:\n        total += n % $b\n        n //= $b\n    return total",
    {"missing_abs": "def $name(n):\n    total = 0\n    while n > 0:\n        total += n % $b\n        n //= $b\n    return total",
     "wrong_base": "def $name(n):\n    n = abs(n)\n    total = 0\n    while n > 0:\n        total += n % 10\n        n //= 10\n    return total"},
    lambda rng, p: [(0,), (7,), (-255,), (p["b"] ** 2 + 1,), (rng.randint(100, 9999),), (-rng.randint(10, 999),)],
    lambda p, n: to_base_digits(n, p["b"]), heldout=8))

F.append(Family(
    "is_prime", [{}], ["is_prime", "check_prime"],
    ["Write a Python function $name(n) that returns True if n is a prime number and False otherwise.",
     "Implement $name(n): is the integer n prime? Numbers below 2 are not prime.",
     "Check whether a number is prime in Python."],
    ["写一个函数 $name(n)，判断整数 n 是否为质数，是则返回 True，否则返回 False。",
     "用Python判断一个数是不是素数。",
     "实现 $name(n)：小于 2 的数不是质数，判断 n 是否为质数。"],
    "def $name(n):\n    if n < 2:\n        return False\n    for d in range(2, int(n ** 0.5) + 1):\n        if n % d == 0:\n            return False\n    return True",
    {"wrong_base_case": "def $name(n):\n    if n < 1:\n        return False\n    for d in range(2, int(n ** 0.5) + 1):\n        if n % d == 0:\n            return False\n    return True",
     "off_by_one": "def $name(n):\n    if n < 2:\n        return False\n    for d in range(2, int(n ** 0.5)):\n        if n % d == 0:\n            return False\n    return True"},
    lambda rng, p: [(0,), (1,), (2,), (3,), (4,), (9,), (25,), (49,), (121,), (-7,), (rng.randint(3, 200),), (97,)],
    lambda p, n: is_prime(n)))

F.append(Family(
    "gcd_lcm", [dict(op="gcd", en="greatest common divisor", zh="最大公约数",
                     code="    while b:\n        a, b = b, a % b\n    return abs(a)"),
                dict(op="lcm", en="least common multiple", zh="最小公倍数",
                     code="    if a == 0 or b == 0:\n        return 0\n    x, y = a, b\n    while y:\n        x, y = y, x % y\n    return abs(a * b) // abs(x)")],
    ["$op", "compute_$op"],
    ["Write $name(a, b) that returns the $en of two integers (non-negative result).",
     "Implement the $en of a and b in Python as $name(a, b)."],
    ["编写函数 $name(a, b)，返回两个整数的$zh（结果非负）。",
     "用Python求两个数的$zh，函数名 $name(a, b)。"],
    "def $name(a, b):\n$code",
    {"missing_return": "def $name(a, b):\n    while b:\n        a, b = b, a % b"},
    lambda rng, p: [(12, 18), (7, 5), (0, 9), (5, 0), (0, 0), (1, 7), (9, 1), (-1, 9), (5, -1), (-4, 6), (rng.randint(1, 60), rng.randint(1, 60)), (21, 14)],
    lambda p, a, b: math.gcd(a, b) if p["op"] == "gcd" else abs(a * b) // math.gcd(a, b) if a and b else 0,
    heldout=0))

F.append(Family(
    "fizzbuzz", [dict(a=a, b=b, x=x, y=y) for a, b, x, y in [
        (3, 5, "Fizz", "Buzz"), (2, 3, "Foo", "Bar"), (3, 7, "Ping", "Pong"), (4, 6, "Tic", "Tac"),
        (2, 5, "Hi", "Yo"), (5, 7, "Zip", "Zap"), (2, 9, "Up", "Down"), (3, 8, "Red", "Blue"),
        (4, 5, "Yin", "Yang"), (2, 11, "Tik", "Tok"),
        (2, 13, "Sun", "Moon"), (3, 11, "Cat", "Dog"), (4, 7, "Left", "Right"), (5, 8, "Tea", "Cake"),
        (6, 7, "Hot", "Cold"), (2, 15, "Fast", "Slow"), (3, 13, "Rock", "Roll"), (4, 11, "Salt", "Pepper"),
        (5, 9, "North", "South"), (6, 11, "East", "West"), (7, 8, "Day", "Night"), (2, 17, "Fire", "Ice"),
        (3, 14, "Star", "Sky"), (4, 13, "Rain", "Snow"), (5, 11, "Bee", "Bop"), (6, 13, "Pip", "Pop"),
        (7, 9, "Max", "Min"), (8, 9, "Ka", "Boom"), (3, 16, "Big", "Small"), (7, 10, "Ice", "Cream"),
        (3, 4, "Foo", "Baz"), (2, 7, "Ab", "Cd"), (4, 9, "Ding", "Dong"), (3, 10, "Bing", "Bong"), (5, 6, "Hop", "Skip")]],
    ["fizzbuzz", "play_game"],
    ["Write $name(n) returning a list for 1..n: '$x$y' for multiples of both $a and $b, '$x' for multiples of $a, '$y' for multiples of $b, otherwise the number as a string.",
     "FizzBuzz variant: implement $name(n) that returns strings for numbers 1 to n, using '$x' for multiples of $a, '$y' for multiples of $b and '$x$y' when both."],
    ["编写 $name(n)，对 1 到 n 返回一个列表：同时是 $a 和 $b 的倍数写 '$x$y'，只是 $a 的倍数写 '$x'，只是 $b 的倍数写 '$y'，其余写数字字符串。",
     "实现变种FizzBuzz函数 $name(n)：$a 的倍数用 '$x'，$b 的倍数用 '$y'，两者都是用 '$x$y'，返回字符串列表。"],
    "def $name(n):\n    out = []\n    for i in range(1, n + 1):\n        if i % $a == 0 and i % $b == 0:\n            out.append('$x$y')\n        elif i % $a == 0:\n            out.append('$x')\n        elif i % $b == 0:\n            out.append('$y')\n        else:\n            out.append(str(i))\n    return out",
    {"wrong_order": "def $name(n):\n    out = []\n    for i in range(1, n + 1):\n        if i % $a == 0:\n            out.append('$x')\n        elif i % $b == 0:\n            out.append('$y')\n        elif i % $a == 0 and i % $b == 0:\n            out.append('$x$y')\n        else:\n            out.append(str(i))\n    return out",
     "wrong_return_type": "def $name(n):\n    out = []\n    for i in range(1, n + 1):\n        if i % $a == 0 and i % $b == 0:\n            out.append('$x$y')\n        elif i % $a == 0:\n            out.append('$x')\n        elif i % $b == 0:\n            out.append('$y')\n        else:\n            out.append(i)\n    return out"},
    lambda rng, p: [(0,), (1,), (p["a"] * p["b"],), (rng.randint(2, 30),)],
    lambda p, n: [p["x"] + p["y"] if i % p["a"] == 0 and i % p["b"] == 0 else p["x"] if i % p["a"] == 0
                  else p["y"] if i % p["b"] == 0 else str(i) for i in range(1, n + 1)], heldout=5))

F.append(Family(
    "reverse_words", [dict(code="' '.join(s.split()[::-1])", en="reverses the order of the words", zh="把单词的顺序反转"),
                      dict(code="' '.join(w[::-1] for w in s.split())", en="reverses the letters of each word but keeps the word order", zh="把每个单词的字母反转但保持单词顺序"),
                      dict(code="' '.join(w.capitalize() for w in s.split())", en="capitalizes the first letter of each word and lowercases the rest", zh="把每个单词首字母大写、其余字母小写"),
                      dict(code="' '.join(sorted(s.split()))", en="sorts the words alphabetically", zh="把单词按字母顺序排序"),
                      dict(code="' '.join(sorted(s.split(), key=len))", en="sorts the words by length, keeping the original order for equal lengths", zh="把单词按长度排序（长度相同保持原顺序）")],
    ["transform_words", "process_words"],
    ["Write $name(s) that $en in the string s; words are separated by spaces and the result joins them with single spaces.",
     "Implement $name(s): split s into words, then return a string that $en (single spaces between words)."],
    ["编写 $name(s)：对字符串 s $zh，结果用单个空格连接单词。",
     "实现函数 $name(s)，按空格切分单词后$zh，返回用一个空格连接的字符串。"],
    "def $name(s):\n    return $code",
    {"wrong_join": "def $name(s):\n    return ''.join(s.split()[::-1])",
     "missing_split": "def $name(s):\n    return s[::-1]"},
    lambda rng, p: strings(rng, ["  one  two three ", "a bb ccc dd"]),
    lambda p, s: eval(p["code"], {"s": s})))

F.append(Family(
    "palindrome", [dict(prep="s", en="exactly as given", zh="区分大小写，不做任何处理"),
                   dict(prep="s.lower()", en="ignoring case", zh="忽略大小写"),
                   dict(prep="''.join(c for c in s if c.isalnum())", en="ignoring non-alphanumeric characters", zh="忽略非字母数字字符"),
                   dict(prep="''.join(c.lower() for c in s if c.isalnum())", en="ignoring case and non-alphanumeric characters", zh="忽略大小写和非字母数字字符")],
    ["is_palindrome", "check_palindrome"],
    ["Write $name(s) that returns True if s is a palindrome, $en.",
     "Check whether a string reads the same backwards, $en. Function: $name(s)."],
    ["编写 $name(s)，判断字符串 s 是否为回文（$zh），返回 True 或 False。",
     "用Python判断回文字符串，$zh，函数名 $name(s)。"],
    "def $name(s):\n    t = $prep\n    return t == t[::-1]",
    {"wrong_slice": "def $name(s):\n    t = $prep\n    return t == t[::-2]",
     "wrong_return_type": "def $name(s):\n    t = $prep\n    return 1 if t == t[::-1] else 0"},
    lambda rng, p: [("",), ("Abba",), ("A man, a plan, a canal: Panama",), ("racecar",), ("race car",), ("ab",),
                    ("No 'x' in Nixon",), ("No lemon, no melon",), (rng.choice(WORDS),)],
    lambda p, s: (lambda t: t == t[::-1])(eval(p["prep"], {"s": s}))))

F.append(Family(
    "caesar", [dict(k=k) for k in seen_then_held(range(1, 26), lambda k: k % 3 == 0)],
    ["caesar", "shift_letters"],
    ["Write $name(s) that shifts every lowercase letter of s forward by $k in the alphabet (wrapping from z to a) and leaves other characters unchanged.",
     "Implement a Caesar cipher with shift $k: $name(s) encodes lowercase letters, everything else stays the same."],
    ["编写 $name(s)：把字符串中每个小写字母在字母表中向后移动 $k 位（z 之后回到 a），其他字符不变。",
     "用Python实现凯撒密码，位移为 $k，函数名 $name(s)，只处理小写字母。"],
    "def $name(s):\n    out = ''\n    for c in s:\n        if 'a' <= c <= 'z':\n            c = chr((ord(c) - 97 + $k) % 26 + 97)\n        out += c\n    return out",
    {"no_wrap": "def $name(s):\n    out = ''\n    for c in s:\n        if 'a' <= c <= 'z':\n            c = chr(ord(c) + $k)\n        out += c\n    return out",
     "wrong_direction": "def $name(s):\n    out = ''\n    for c in s:\n        if 'a' <= c <= 'z':\n            c = chr((ord(c) - 97 - $k) % 26 + 97)\n        out += c\n    return out"},
    lambda rng, p: strings(rng, ["xyz abc", "Zoo!"]),
    lambda p, s: "".join(chr((ord(c) - 97 + p["k"]) % 26 + 97) if "a" <= c <= "z" else c for c in s)))

F.append(Family(
    "run_length", [dict(fmt="c + str(n)", en="each character followed by its count (\"aaab\" -> \"a3b1\")", zh="字符后跟次数（\"aaab\" -> \"a3b1\"）", df=False),
                   dict(fmt="str(n) + c", en="each count followed by its character (\"aaab\" -> \"3a1b\")", zh="次数后跟字符（\"aaab\" -> \"3a1b\"）", df=True)],
    ["run_length_encode", "compress"],
    ["Write $name(s) that run-length encodes s, writing $en.",
     "Implement run-length encoding in Python: $name(s) returns $en."],
    ["编写 $name(s) 对字符串做游程编码，格式为$zh。",
     "用Python实现行程长度编码 $name(s)，输出格式：$zh。"],
    "def $name(s):\n    out = ''\n    i = 0\n    while i < len(s):\n        j = i\n        while j < len(s) and s[j] == s[i]:\n            j += 1\n        c, n = s[i], j - i\n        out += $fmt\n        i = j\n    return out",
    {"off_by_one": "def $name(s):\n    out = ''\n    i = 0\n    while i < len(s):\n        j = i + 1\n        while j < len(s) and s[j] == s[i]:\n            j += 1\n        c, n = s[i], j - i - 1\n        out += $fmt\n        i = j\n    return out"},
    lambda rng, p: [("",), ("a",), ("aaab",), ("abc",), ("zzzzzzzzzzzz",)] + [("".join(rng.choice("ab") * rng.randint(1, 3) for _ in range(4)),)],
    lambda p, s: rle(s, p["df"]), heldout=0))

# held out: combinations whose parts were each seen with other partners ((i + j) % 3 == 0)
_FM, _FM_HELD = held_last([dict(f=f, fen=fen, fzh=fzh, m=m, men=men, mzh=mzh, ij=i + j)
                           for i, (f, fen, fzh) in enumerate(FILTERS) for j, (m, men, mzh) in enumerate(MAPS)],
                          lambda p: p["ij"] % 3 == 0)
_FR, _FR_HELD = held_last([dict(f=f, fen=fen, fzh=fzh, a=a, aen=aen, azh=azh, ai=j, ij=i + j)
                           for i, (f, fen, fzh) in enumerate(FILTERS) for j, (a, aen, azh, _) in enumerate(AGGS)],
                          lambda p: p["ij"] % 3 == 0)
F.append(Family(
    "filter_map", _FM,
    ["filter_map", "transform"],
    ["Write $name(nums) that returns a list with $men each $fen number in nums, in order.",
     "Keep only the $fen numbers of the list nums and replace each by $men it. Function: $name(nums).",
     "Implement $name(nums): filter the $fen elements, then map each x to $men x; return the new list."],
    ["编写 $name(nums)：取出列表中的$fzh，把每个数变成它的$mzh，按原顺序返回新列表。",
     "实现函数 $name(nums)，先筛选出$fzh，再求每个的$mzh，返回列表。",
     "用Python写 $name(nums)：返回 nums 中所有$fzh的$mzh组成的列表。"],
    "def $name(nums):\n    return [$m for x in nums if $f]",
    {"missing_filter": "def $name(nums):\n    return [$m for x in nums]",
     "missing_map": "def $name(nums):\n    return [x for x in nums if $f]"},
    lambda rng, p: lists(rng, [[1, 2, 3, 12, -6, 11]]),
    lambda p, nums: [fx(p["m"])(x) for x in nums if fx(p["f"])(x)], heldout=_FM_HELD,
    # the absolute value of a negative number is its negation: those two prompts ask one thing
    behaviour=lambda p: (p["f"], "-x" if (p["f"], p["m"]) == ("x < 0", "abs(x)") else p["m"])))

F.append(Family(
    "filter_reduce", _FR,
    ["filter_aggregate", "summarize"],
    ["Write $name(nums) returning $aen of the $fen numbers in nums.",
     "Implement $name(nums): among the $fen elements of nums, compute $aen."],
    ["编写 $name(nums)，返回列表中所有$fzh的$azh。",
     "实现函数 $name(nums)：在 nums 的$fzh里求$azh。"],
    "def $name(nums):\n    vals = [x for x in nums if $f]\n    return $a",
    {"missing_filter": "def $name(nums):\n    vals = nums\n    return $a",
     "wrong_condition": "def $name(nums):\n    vals = [x for x in nums if not ($f)]\n    return $a"},
    lambda rng, p: lists(rng, [[1, 2, 3, 12, -6, 11], [4, 4, -9], [1], [-1], [10], [11]]),
    lambda p, nums: AGGS[p["ai"]][3]([x for x in nums if fx(p["f"])(x)]), heldout=_FR_HELD))

F.append(Family(
    "word_freq", [dict(prep="text", en="case-sensitive", zh="区分大小写"),
                  dict(prep="text.lower()", en="case-insensitive (use lowercase keys)", zh="不区分大小写（键用小写）")],
    ["word_count", "count_words"],
    ["Write $name(text) that returns a dict mapping each space-separated word to how often it occurs, $en.",
     "Count word frequencies in Python ($en): $name(text) returns a dictionary word -> count."],
    ["编写 $name(text)，返回一个字典，记录每个单词（按空格分隔）出现的次数，$zh。",
     "用Python统计词频（$zh），函数 $name(text) 返回 单词->次数 的字典。"],
    "def $name(text):\n    counts = {}\n    for w in $prep.split():\n        counts[w] = counts.get(w, 0) + 1\n    return counts",
    {"wrong_init": "def $name(text):\n    counts = {}\n    for w in $prep.split():\n        counts[w] = counts.get(w, 1) + 1\n    return counts",
     "wrong_return_type": "def $name(text):\n    counts = {}\n    for w in $prep.split():\n        counts[w] = counts.get(w, 0) + 1\n    return list(counts.items())"},
    lambda rng, p: strings(rng, ["the cat The cat", "Data data DATA"]),
    lambda p, text: {w: eval(p["prep"], {"text": text}).split().count(w) for w in eval(p["prep"], {"text": text}).split()},
    heldout=0))

F.append(Family(
    "group_by", [dict(key="len(w)", en="its length", zh="长度"), dict(key="w[0]", en="its first letter", zh="首字母"),
                 dict(key="w[-1]", en="its last letter", zh="最后一个字母")],
    ["group_words", "group_by_key"],
    ["Write $name(words) that groups the words of a list by $en: return a dict key -> list of words in their original order.",
     "Implement $name(words): build a dictionary that maps $en to the words having it (keep input order)."],
    ["编写 $name(words)，按单词的$zh分组，返回字典：键 -> 按原顺序排列的单词列表。",
     "实现 $name(words)：用字典把单词按$zh归类，保持原来的顺序。"],
    "def $name(words):\n    groups = {}\n    for w in words:\n        groups.setdefault($key, []).append(w)\n    return groups",
    {"overwrite": "def $name(words):\n    groups = {}\n    for w in words:\n        groups[$key] = [w]\n    return groups"},
    lambda rng, p: [([],), (["a"],), (["apple", "avocado", "kiwi", "fig", "plum"],)] + [([rng.choice(WORDS) for _ in range(5)],) for _ in range(2)],
    lambda p, words: {k: [w for w in words if eval(p["key"], {"w": w}) == k] for k in dict.fromkeys(eval(p["key"], {"w": w}) for w in words)}))

F.append(Family(
    "invert_dict", [dict(mode="last"), dict(mode="lists")],
    ["invert_dict", "swap_keys_values"],
    ["Write $name(d) that swaps keys and values of the dict d${extra_en}",
     "Implement $name(d): return a new dict mapping each value of d back to its key${extra_en}"],
    ["编写 $name(d)，交换字典 d 的键和值${extra_zh}",
     "实现 $name(d)：返回把值映射回键的新字典${extra_zh}"],
    "$code", {"$bugkind": "$bug"},
    lambda rng, p: [({},), ({"a": 1},), ({"a": 1, "b": 2, "c": 1},), ({1: "x", 2: "y", 3: "x", 4: "z"},)],
    lambda p, d: ({v: k for k, v in d.items()} if p["mode"] == "last" else
                  {v: [k for k in d if d[k] == v] for v in dict.fromkeys(d.values())}),
    heldout=0))
# invert_dict's two modes need different code; fill in their templates here to keep them flat
F[-1].params = [
    dict(mode="last", extra_en="; when several keys share a value, the last one wins.",
         extra_zh="；多个键有相同的值时保留最后一个。",
         code="def $name(d):\n    out = {}\n    for k, v in d.items():\n        out[v] = k\n    return out",
         bugkind="wrong_direction",
         bug="def $name(d):\n    out = {}\n    for k, v in d.items():\n        out[k] = v\n    return out"),
    dict(mode="lists", extra_en="; each value maps to the list of all its keys in order.",
         extra_zh="；每个值对应所有拥有它的键组成的列表（按原顺序）。",
         code="def $name(d):\n    out = {}\n    for k, v in d.items():\n        out.setdefault(v, []).append(k)\n    return out",
         bugkind="overwrite",
         bug="def $name(d):\n    out = {}\n    for k, v in d.items():\n        out[v] = [k]\n    return out")]

F.append(Family(
    "kth_largest", [dict(k=k) for k in seen_then_held(range(1, 31), lambda k: k % 3 == 0)],
    ["kth_largest", "nth_biggest"],
    ["Write $name(nums) returning the ${k}-th largest distinct value in nums, or None if there are fewer than $k distinct values.",
     "Implement $name(nums): sort the distinct values in descending order and return the one at position $k (1-based); None if missing."],
    ["编写 $name(nums)，返回列表中第 $k 大的不同值；不同的值少于 $k 个时返回 None。",
     "实现函数 $name(nums)：去重后降序排列，返回第 $k 个（从1开始数），不存在则返回 None。"],
    "def $name(nums):\n    vals = sorted(set(nums), reverse=True)\n    if len(vals) < $k:\n        return None\n    return vals[$k - 1]",
    {"no_dedup": "def $name(nums):\n    vals = sorted(nums, reverse=True)\n    if len(vals) < $k:\n        return None\n    return vals[$k - 1]",
     "off_by_one": "def $name(nums):\n    vals = sorted(set(nums), reverse=True)\n    if len(vals) <= $k:\n        return None\n    return vals[$k - 1]"},
    lambda rng, p: lists(rng, [list(range(p["k"])), list(range(p["k"] - 1)), [9, 9, 8, 7, 7, 6, 5, 4],
                               sorted(list(range(p["k"])) * 2), list(range(p["k"] - 1)) * 2]),
    lambda p, nums: (lambda v: v[p["k"] - 1] if len(v) >= p["k"] else None)(sorted(set(nums), reverse=True))))

F.append(Family(
    "prefix_scan", [dict(init="0", step="acc + x", en="running sums", zh="前缀和"),
                    dict(init="None", step="x if acc is None else max(acc, x)", en="running maximums", zh="前缀最大值"),
                    dict(init="None", step="x if acc is None else min(acc, x)", en="running minimums", zh="前缀最小值"),
                    dict(init="1", step="acc * x", en="running products", zh="前缀积")],
    ["running", "prefix_values"],
    ["Write $name(nums) that returns the list of $en of nums (the i-th item covers nums[0..i]).",
     "Implement $name(nums): compute the $en, one per position of nums."],
    ["编写 $name(nums)，返回列表 nums 的$zh列表（第 i 项对应 nums[0..i]）。",
     "实现函数 $name(nums)：计算每个位置的$zh。"],
    "def $name(nums):\n    out, acc = [], $init\n    for x in nums:\n        acc = $step\n        out.append(acc)\n    return out",
    {"append_before_update": "def $name(nums):\n    out, acc = [], $init\n    for x in nums:\n        out.append(acc)\n        acc = $step\n    return out"},
    lambda rng, p: lists(rng, lo=-5, hi=5),
    lambda p, nums: _scan(p, nums)))


def _scan(p, nums):
    out, acc = [], eval(p["init"])
    for x in nums:
        acc = eval(p["step"], {"acc": acc, "x": x})
        out.append(acc)
    return out


F.append(Family(
    "chunk", [dict(k=k) for k in seen_then_held(range(2, 31), lambda k: k % 3 == 1)],
    ["chunk", "split_into_groups"],
    ["Write $name(lst) that splits lst into consecutive pieces of length $k (the last piece may be shorter) and returns them as a list of lists.",
     "Implement $name(lst): break the list into chunks of $k elements."],
    ["编写 $name(lst)，把列表按每 $k 个元素分成一组（最后一组可以不足 $k 个），返回列表的列表。",
     "实现 $name(lst)：将列表切成长度为 $k 的若干块。"],
    "def $name(lst):\n    return [lst[i:i + $k] for i in range(0, len(lst), $k)]",
    {"drops_tail": "def $name(lst):\n    return [lst[i:i + $k] for i in range(0, len(lst) - $k + 1, $k)]",
     "wrong_step": "def $name(lst):\n    return [lst[i:i + $k] for i in range(0, len(lst))]"},
    lambda rng, p: lists(rng, [list(range(2 * p["k"] + 1))]),
    lambda p, lst: [lst[i:i + p["k"]] for i in range(0, len(lst), p["k"])]))

F.append(Family(
    "rotate", [dict(k=k, d=d, den=den, dzh=dzh) for d, den, dzh in (("left", "left", "左"), ("right", "right", "右")) for k in range(1, 16)],
    ["rotate_${d}", "rotate"],
    ["Write $name(lst) that rotates the list $den by $k positions (wrapping around) and returns a new list; an empty list stays empty.",
     "Implement $name(lst): cyclically shift the elements $k places to the $den."],
    ["编写 $name(lst)，把列表循环向${dzh}移动 $k 位并返回新列表，空列表返回空列表。",
     "实现 $name(lst)：列表元素整体循环${dzh}移 $k 位。"],
    "def $name(lst):\n    if not lst:\n        return []\n    k = $k % len(lst)\n    return ${body}",
    {"wrong_direction": "def $name(lst):\n    if not lst:\n        return []\n    k = $k % len(lst)\n    return ${wrong}",
     "missing_guard": "def $name(lst):\n    k = $k % len(lst)\n    return ${body}"},
    lambda rng, p: lists(rng, [[1, 2, 3, 4, 5], list(range(2 * p["k"] + 3))]),
    lambda p, lst: (lambda k: lst[k:] + lst[:k] if p["d"] == "left" else lst[len(lst) - k:] + lst[:len(lst) - k])(p["k"] % len(lst)) if lst else [],
    heldout=10))
for p_ in F[-1].params:
    left, right = "lst[k:] + lst[:k]", "lst[-k:] + lst[:-k] if k else lst[:]"
    p_["body"], p_["wrong"] = (left, right) if p_["d"] == "left" else (right, left)
F[-1].params.sort(key=lambda p_: p_["k"] % 3 == 0)  # k = 3, 6, 9, 12 and 15 (both directions) are held out

F.append(Family(
    "dedupe", [dict(mode="first", en="keeping the first occurrence of each value", zh="保留每个值第一次出现的位置"),
               dict(mode="consecutive", en="removing only consecutive repeats (\"aab a\" style runs)", zh="只去掉相邻的重复元素")],
    ["remove_duplicates", "dedupe"],
    ["Write $name(lst) that removes duplicates from lst, $en, and returns a new list.",
     "Implement $name(lst): return the list without duplicates, $en."],
    ["编写 $name(lst)，去除列表中的重复元素（$zh），返回新列表。",
     "实现函数 $name(lst)：列表去重，$zh。"],
    "$code", {"$bugkind": "$bug"},
    lambda rng, p: lists(rng, [[1, 1, 2, 1, 2, 2, 3]], lo=0, hi=4),
    lambda p, lst: list(dict.fromkeys(lst)) if p["mode"] == "first" else [x for i, x in enumerate(lst) if i == 0 or lst[i - 1] != x],
    heldout=0))
F[-1].params[0].update(code="def $name(lst):\n    seen, out = set(), []\n    for x in lst:\n        if x not in seen:\n            seen.add(x)\n            out.append(x)\n    return out",
                       bugkind="wrong_return_type", bug="def $name(lst):\n    return set(lst)")
F[-1].params[1].update(code="def $name(lst):\n    out = []\n    for x in lst:\n        if not out or out[-1] != x:\n            out.append(x)\n    return out",
                       bugkind="wrong_comparison", bug="def $name(lst):\n    out = []\n    for x in lst:\n        if not out or out[-1] == x:\n            out.append(x)\n    return out")

F.append(Family(
    "flatten", [{}], ["flatten", "flatten_list"],
    ["Write a recursive function $name(lst) that flattens arbitrarily nested lists into one flat list.",
     "Flatten a nested list in Python using recursion.", "Implement $name(lst): return all non-list items of a nested list, in order."],
    ["编写递归函数 $name(lst)，把任意层嵌套的列表展开成一维列表。",
     "用Python递归实现嵌套列表展开。", "实现 $name(lst)：按顺序返回嵌套列表中所有非列表元素。"],
    "def $name(lst):\n    out = []\n    for x in lst:\n        if isinstance(x, list):\n            out.extend($name(x))\n        else:\n            out.append(x)\n    return out",
    {"one_level": "def $name(lst):\n    out = []\n    for x in lst:\n        if isinstance(x, list):\n            out.extend(x)\n        else:\n            out.append(x)\n    return out",
     "missing_recursion_result": "def $name(lst):\n    out = []\n    for x in lst:\n        if isinstance(x, list):\n            $name(x)\n        else:\n            out.append(x)\n    return out"},
    lambda rng, p: [([],), ([1, [2, [3, [4]]]],), ([[], [[]]],), ([1, 2, 3],), ([[rng.randint(0, 9)], rng.randint(0, 9), [[rng.randint(0, 9), [5]]]],)],
    lambda p, lst: _flat(lst)))


def _flat(lst):
    return [y for x in lst for y in (_flat(x) if isinstance(x, list) else [x])]


F.append(Family(
    "two_sum", [{}], ["two_sum", "find_pair"],
    ["Write $name(nums, target) that returns the indices (i, j) with i < j of the first pair (smallest j, then smallest i) whose values add up to target, or None.",
     "Two sum: implement $name(nums, target) returning a tuple of two indices i < j with nums[i] + nums[j] == target (smallest j first), None if there is no pair."],
    ["编写 $name(nums, target)：找出和为 target 的两个下标 (i, j)，i < j，优先返回 j 最小的（j 相同则 i 最小），找不到返回 None。",
     "用Python实现两数之和 $name(nums, target)，返回下标元组 (i, j)，没有则返回 None。"],
    "def $name(nums, target):\n    seen = {}\n    for j, x in enumerate(nums):\n        if target - x in seen:\n            return (seen[target - x], j)\n        seen.setdefault(x, j)\n    return None",
    {"same_index": "def $name(nums, target):\n    seen = {}\n    for j, x in enumerate(nums):\n        seen.setdefault(x, j)\n        if target - x in seen:\n            return (seen[target - x], j)\n    return None",
     "wrong_return_type": "def $name(nums, target):\n    seen = {}\n    for j, x in enumerate(nums):\n        if target - x in seen:\n            return [seen[target - x], j]\n        seen.setdefault(x, j)\n    return None"},
    lambda rng, p: [([], 3), ([3, 3], 6), ([1, 2, 3, 4], 7), ([2, 7, 11, 15], 9), ([5], 10), ([1, 2], 4), (ints(rng, 6, 0, 9), rng.randint(3, 12))],
    lambda p, nums, target: next(((i, j) for j in range(len(nums)) for i in range(j) if nums[i] + nums[j] == target), None)))

_FIB_FIRST = ((0, 1), (1, 1), (2, 1), (1, 2), (0, 2), (3, 2), (1, 3), (2, 2))  # the seeds of the first builds
_FIB_HELD = ((3, 1), (2, 3), (4, 1), (0, 3))
F.append(Family(
    "fibonacci", [dict(a=a, b=b) for a, b in _FIB_FIRST + tuple((a, b) for a in range(6) for b in range(1, 6)
                                                               if (a, b) not in _FIB_FIRST + _FIB_HELD) + _FIB_HELD],
    ["fib", "sequence_term"],
    ["Write $name(n) returning the n-th term (0-based) of the sequence with f(0) = $a, f(1) = $b and f(n) = f(n-1) + f(n-2).",
     "Implement $name(n) iteratively: a Fibonacci-like sequence starting $a, $b; return term number n (starting from 0)."],
    ["编写 $name(n)，返回数列第 n 项（从0开始），其中 f(0)=$a，f(1)=$b，f(n)=f(n-1)+f(n-2)。",
     "用循环实现 $name(n)：类斐波那契数列，前两项为 $a 和 $b，返回第 n 项（下标从0开始）。"],
    "def $name(n):\n    a, b = $a, $b\n    for _ in range(n):\n        a, b = b, a + b\n    return a",
    {"off_by_one": "def $name(n):\n    a, b = $a, $b\n    for _ in range(n - 1):\n        a, b = b, a + b\n    return a",
     "wrong_return": "def $name(n):\n    a, b = $a, $b\n    for _ in range(n):\n        a, b = b, a + b\n    return b"},
    lambda rng, p: [(0,), (1,), (2,), (rng.randint(5, 12),), (rng.randint(13, 25),)],
    lambda p, n: _fib(p["a"], p["b"], n), heldout=4))


def _fib(a, b, n):
    for _ in range(n):
        a, b = b, a + b
    return a


F.append(Family(
    "factorial_like", [dict(op="*", start=1, en="the product 1 * 2 * ... * n (the factorial; 1 for n = 0)", zh="阶乘 1*2*...*n（n=0 时为 1）", base=1),
                       dict(op="+", start=0, en="the sum 1 + 2 + ... + n (0 for n = 0)", zh="和 1+2+...+n（n=0 时为 0）", base=0)],
    ["recursive_${op_name}", "compute"],
    ["Write a recursive function $name(n) for n >= 0 that returns $en.",
     "Implement $name(n) with recursion (no loops): return $en."],
    ["编写递归函数 $name(n)（n >= 0），返回$zh。",
     "用递归实现 $name(n)：返回$zh，不要用循环。"],
    "def $name(n):\n    if n == 0:\n        return $base\n    return n $op $name(n - 1)",
    {"wrong_base_case": "def $name(n):\n    if n == 0:\n        return n\n    return n $op $name(n - 1)",
     "missing_return": "def $name(n):\n    if n == 0:\n        return $base\n    n $op $name(n - 1)"},
    lambda rng, p: [(0,), (1,), (5,), (rng.randint(6, 15),)],
    lambda p, n: valid(n >= 0) or (math.factorial(n) if p["op"] == "*" else n * (n + 1) // 2), heldout=0))
F[-1].params[0]["op_name"], F[-1].params[1]["op_name"] = "factorial", "sum"

F.append(Family(
    # odd rules m * n + c (c odd) under which many odd starts reach 1: 3n+3 reached it from powers of
    # two alone, so no test could tell its odd rule from any other's
    "collatz", [dict(m=m, c=c, rule=f"{m} * n {'+-'[c < 0]} {abs(c)}", zrule=f"乘{m}{'加减'[c < 0]}{abs(c)}")
                for m, c in ((3, 1), (3, 7), (5, -1), (3, -1), (5, 7), (5, 1), (3, 13), (5, 11),
                             (5, 9), (3, 11), (5, -3), (3, 5))],
    ["collatz_steps", "count_steps"],
    ["Write $name(n) for n >= 1 that counts the steps to reach 1, where an even n becomes n // 2 and an odd n becomes $rule.",
     "Implement $name(n): repeat n -> n // 2 (even) or n -> $rule (odd) until n == 1 and return the number of steps."],
    ["编写 $name(n)（n >= 1）：偶数变为 n // 2，奇数变为 $rule，返回变到 1 需要的步数。",
     "实现函数 $name(n)，统计按“偶数除以2、奇数${zrule}”的规则变到1的步数。"],
    "def $name(n):\n    steps = 0\n    while n != 1:\n        n = n // 2 if n % 2 == 0 else $rule\n        steps += 1\n    return steps",
    {"off_by_one": "def $name(n):\n    steps = 1\n    while n != 1:\n        n = n // 2 if n % 2 == 0 else $rule\n        steps += 1\n    return steps"},
    lambda rng, p: [(1,), (2,), (16,)] + [(n,) for n in rng.sample(_collatz_starts(p["m"], p["c"])[0], 3)]
    + [(rng.choice(_collatz_starts(p["m"], p["c"])[1]),)],
    lambda p, n: _collatz(n, p["m"], p["c"]), heldout=4))


def _collatz(n, m, c, limit=10000):
    valid(n >= 1)
    steps = 0
    while n != 1:
        n, steps = (n // 2 if n % 2 == 0 else m * n + c), steps + 1
        if steps > limit:  # some starts cycle or grow under these rules: not a valid input
            raise ValueError(f"{n} does not reach 1 in {limit} steps under {m} * n + {c}")
    return steps


@functools.lru_cache(maxsize=None)
def _collatz_starts(m, c):
    """(odd starts, even starts that are not powers of two) in 3..300 that reach 1 within 500 steps."""
    def reaches(n):
        try:
            return _collatz(n, m, c, limit=500) >= 0
        except ValueError:
            return False
    ok = [n for n in range(3, 301) if reaches(n)]
    return [n for n in ok if n % 2], [n for n in ok if n % 2 == 0 and n & (n - 1)]


F.append(Family(
    "grid_paths", [dict(moves="right or down", zh="只能向右或向下")], ["grid_paths", "count_paths"],
    ["Write a recursive function $name(m, n) counting the paths from the top-left to the bottom-right of an m x n grid moving only $moves (m, n >= 1).",
     "Count lattice paths in Python: $name(m, n) for an m by n grid, moves $moves only."],
    ["编写递归函数 $name(m, n)，计算在 m×n 网格中从左上角走到右下角的路径数，$zh（m、n >= 1）。",
     "用Python计算网格路径数 $name(m, n)，$zh。"],
    "def $name(m, n):\n    if m == 1 or n == 1:\n        return 1\n    return $name(m - 1, n) + $name(m, n - 1)",
    {"wrong_base_case": "def $name(m, n):\n    if m == 1 and n == 1:\n        return 1\n    if m == 0 or n == 0:\n        return 1\n    return $name(m - 1, n) + $name(m, n - 1)"},
    lambda rng, p: [(1, 1), (2, 2), (3, 3), (1, 5), (rng.randint(2, 6), rng.randint(2, 6))],
    lambda p, m, n: valid(m >= 1 and n >= 1) or math.comb(m + n - 2, m - 1)))

F.append(Family(
    "binary_search", [dict(mode="index"), dict(mode="insert")],
    ["binary_search", "search_sorted"],
    ["Write $name(arr, target) using binary search on the ascending list arr${en}",
     "Implement binary search in Python: $name(arr, target)${en}"],
    ["编写 $name(arr, target)，在升序列表 arr 上用二分查找${zh}",
     "用Python实现二分查找 $name(arr, target)${zh}"],
    "$code", {"$bugkind": "$bug"},
    lambda rng, p: [([], 3), ([1], 1), ([1, 3, 5, 7], 7), ([1, 3, 5, 7], 1), ([1, 3, 5, 7], 4), ([1, 3, 5, 7], 0),
                    ([3, 5, 7], 3), ([3, 5, 7], 7), ([2, 4], 2), ([2, 4], 4), ([2, 4, 6, 8, 10], 10)] + [(sorted(set(ints(rng, 8, -20, 20))), rng.randint(-20, 20))],
    lambda p, arr, target: _search(arr, target, p["mode"]),
    heldout=0))
F[-1].params[0].update(en="; return the index of target, or -1 if it is absent.", zh="，返回 target 的下标，找不到返回 -1。",
                       code="def $name(arr, target):\n    lo, hi = 0, len(arr) - 1\n    while lo <= hi:\n        mid = (lo + hi) // 2\n        if arr[mid] == target:\n            return mid\n        if arr[mid] < target:\n            lo = mid + 1\n        else:\n            hi = mid - 1\n    return -1",
                       bugkind="off_by_one", bug="def $name(arr, target):\n    lo, hi = 0, len(arr) - 1\n    while lo < hi:\n        mid = (lo + hi) // 2\n        if arr[mid] == target:\n            return mid\n        if arr[mid] < target:\n            lo = mid + 1\n        else:\n            hi = mid - 1\n    return -1")
F[-1].params[1].update(en="; return the leftmost index where target could be inserted to keep arr sorted.", zh="，返回 target 插入后仍保持有序的最左位置。",
                       code="def $name(arr, target):\n    lo, hi = 0, len(arr)\n    while lo < hi:\n        mid = (lo + hi) // 2\n        if arr[mid] < target:\n            lo = mid + 1\n        else:\n            hi = mid\n    return lo",
                       bugkind="wrong_comparison", bug="def $name(arr, target):\n    lo, hi = 0, len(arr)\n    while lo < hi:\n        mid = (lo + hi) // 2\n        if arr[mid] <= target:\n            lo = mid + 1\n        else:\n            hi = mid\n    return lo")


def _search(arr, target, mode):
    valid(all(a < b for a, b in zip(arr, arr[1:])))
    return (arr.index(target) if target in arr else -1) if mode == "index" else sum(1 for x in arr if x < target)


SORT_DIRS = [dict(lt="<", gt=">", rev=False, den="ascending", dzh="升序"),
             dict(lt=">", gt="<", rev=True, den="descending", dzh="降序")]
F.append(Family(
    "quick_sort", held_last([dict(d, key=k, ken=ken, kzh=kzh, skey=(nk if d["rev"] else k), okey=(k if d["rev"] else nk))
                             for k, nk, ken, kzh in (("x", "-x", "", ""), ("abs(x)", "-abs(x)", " by absolute value", "按绝对值"),
                                                     ("x % 10", "-(x % 10)", " by last digit (x % 10)", "按个位数 (x % 10) "))
                             for d in SORT_DIRS],
                            lambda p: (p["key"], p["rev"]) in (("abs(x)", True), ("x % 10", False)))[0],
    ["quick_sort", "quicksort"],
    ["Implement quicksort in Python: $name(arr) returns a new list sorted in $den order$ken.",
     "Write $name(arr) that sorts a list of integers$ken in $den order using the quick sort algorithm (return a new list; equal keys keep their order).",
     "Python quick sort, $den$ken."],
    ["用Python实现快速排序算法，函数 $name(arr) 返回${kzh}${dzh}排列的新列表。",
     "用Python实现快速排序算法${kzh}${dzh}排列",
     "编写 $name(arr)，使用快速排序把整数列表${kzh}按${dzh}排序，返回新列表（键相同的元素保持原顺序）。"],
    # one program for both orders: descending sorts by the negated key, so the partition and the
    # return line never change and the prompt decides one spot, the key (with `$lt`/`$gt` in the
    # partition, or the order in the return line, the model copied one side's choice into the other)
    "def $name(arr):\n    if len(arr) <= 1:\n        return arr[:]\n    key = lambda x: $skey\n    p = key(arr[0])\n    left = [x for x in arr if key(x) < p]\n    mid = [x for x in arr if key(x) == p]\n    right = [x for x in arr if key(x) > p]\n    return $name(left) + mid + $name(right)",
    {"drops_duplicates": "def $name(arr):\n    if len(arr) <= 1:\n        return arr[:]\n    key = lambda x: $skey\n    p = key(arr[0])\n    left = [x for x in arr if key(x) < p]\n    right = [x for x in arr if key(x) > p]\n    return $name(left) + [arr[0]] + $name(right)",
     "wrong_comparison": "def $name(arr):\n    if len(arr) <= 1:\n        return arr[:]\n    key = lambda x: $skey\n    p = key(arr[0])\n    left = [x for x in arr if key(x) < p]\n    mid = [x for x in arr if key(x) == p]\n    right = [x for x in arr if key(x) < p]\n    return $name(left) + mid + $name(right)",
     "wrong_direction": "def $name(arr):\n    if len(arr) <= 1:\n        return arr[:]\n    key = lambda x: $okey\n    p = key(arr[0])\n    left = [x for x in arr if key(x) < p]\n    mid = [x for x in arr if key(x) == p]\n    right = [x for x in arr if key(x) > p]\n    return $name(left) + mid + $name(right)"},
    lambda rng, p: lists(rng, [[3, -3, 13, 1, -1]]),
    lambda p, arr: sorted(arr, key=fx(p["key"]), reverse=p["rev"]), heldout=2))
F[-1].en[2] = "Python quick sort: write $name(arr) returning the list sorted$ken in $den order."
# the bare natural prompt means the convention: quick_sort(arr), ascending
F[-1].bare = [("zh", "用Python实现快速排序算法"), ("en", "Implement the quicksort algorithm in Python.")]

F.append(Family(
    "simple_sorts", [dict(d, algo=a, aen=aen, azh=azh) for a, aen, azh in (("bubble", "bubble sort", "冒泡排序"), ("insertion", "insertion sort", "插入排序"), ("selection", "selection sort", "选择排序")) for d in SORT_DIRS],
    ["${algo}_sort", "sort_list"],
    ["Implement $aen in Python: $name(arr) returns a new list in $den order.",
     "Write $name(arr) that sorts a copy of arr in $den order with $aen."],
    ["用Python实现${azh}，函数 $name(arr) 返回${dzh}排列的新列表。",
     "编写 $name(arr)，用${azh}把列表的副本按${dzh}排序后返回。"],
    "$code", {"$bugkind": "$bug"},
    lambda rng, p: lists(rng, [[3, 1, 2], [1, 3, 2, 5, 4]]),
    lambda p, arr: sorted(arr, reverse=p["rev"]), heldout=3, behaviour=lambda p: p["rev"]))
_SORT = {
    "bubble": ("def $name(arr):\n    a = arr[:]\n    for i in range(len(a)):\n        for j in range(len(a) - 1 - i):\n            if a[j] $gt a[j + 1]:\n                a[j], a[j + 1] = a[j + 1], a[j]\n    return a",
               "off_by_one", "def $name(arr):\n    a = arr[:]\n    for i in range(len(a)):\n        for j in range(len(a) - 2 - i):\n            if a[j] $gt a[j + 1]:\n                a[j], a[j + 1] = a[j + 1], a[j]\n    return a"),
    "insertion": ("def $name(arr):\n    a = arr[:]\n    for i in range(1, len(a)):\n        x, j = a[i], i - 1\n        while j >= 0 and a[j] $gt x:\n            a[j + 1] = a[j]\n            j -= 1\n        a[j + 1] = x\n    return a",
                  "wrong_comparison", "def $name(arr):\n    a = arr[:]\n    for i in range(1, len(a)):\n        x, j = a[i], i - 1\n        while j > 0 and a[j] $gt x:\n            a[j + 1] = a[j]\n            j -= 1\n        a[j + 1] = x\n    return a"),
    "selection": ("def $name(arr):\n    a = arr[:]\n    for i in range(len(a)):\n        m = i\n        for j in range(i + 1, len(a)):\n            if a[j] $lt a[m]:\n                m = j\n        a[i], a[m] = a[m], a[i]\n    return a",
                  "wrong_index", "def $name(arr):\n    a = arr[:]\n    for i in range(len(a)):\n        m = i\n        for j in range(i + 1, len(a)):\n            if a[j] $lt a[i]:\n                m = j\n        a[i], a[m] = a[m], a[i]\n    return a"),
}
for p_ in F[-1].params:
    p_["code"], p_["bugkind"], p_["bug"] = _SORT[p_["algo"]]
# the algorithms sort alike (no test tells bubble from insertion sort): the descending ones, one task
# for evaluation, are held out together
F[-1].params.sort(key=lambda p_: p_["rev"])

F.append(Family(
    "merge_sorted", [dict(d) for d in SORT_DIRS], ["merge_sorted", "merge_lists"],
    ["Write $name(a, b) that merges two lists already sorted in $den order into one $den list without calling sort.",
     "Implement the merge step of merge sort: $name(a, b) combines two $den sorted lists."],
    ["编写 $name(a, b)，把两个已按${dzh}排好的列表合并成一个${dzh}列表，不要调用 sort。",
     "实现归并排序的合并步骤 $name(a, b)：合并两个${dzh}列表。"],
    "def $name(a, b):\n    i = j = 0\n    out = []\n    while i < len(a) and j < len(b):\n        if a[i] $lt= b[j]:\n            out.append(a[i])\n            i += 1\n        else:\n            out.append(b[j])\n            j += 1\n    return out + a[i:] + b[j:]",
    {"drops_tail": "def $name(a, b):\n    i = j = 0\n    out = []\n    while i < len(a) and j < len(b):\n        if a[i] $lt= b[j]:\n            out.append(a[i])\n            i += 1\n        else:\n            out.append(b[j])\n            j += 1\n    return out"},
    lambda rng, p: [([], []), ([1], []), ([], [2, 1] if p["rev"] else [1, 2]), ([5, 3, 1], [4, 2]) if p["rev"] else ([1, 3, 5], [2, 4])] + [(sorted(ints(rng), reverse=p["rev"]), sorted(ints(rng), reverse=p["rev"]))],
    lambda p, a, b: _merged(a, b, p["rev"]), heldout=0))


def _merged(a, b, rev):
    valid(all(x == sorted(x, reverse=rev) for x in (a, b)))
    return sorted(a + b, reverse=rev)

TRAVERSALS = [dict(order="in", en="inorder", zh="中序"), dict(order="pre", en="preorder", zh="前序"),
              dict(order="post", en="postorder", zh="后序"), dict(order="level", en="level-order (breadth-first)", zh="层序")]
_TRAV = {
    "in": "def $name(root):\n    if root is None:\n        return []\n    return $name(root.left) + [root.val] + $name(root.right)",
    "pre": "def $name(root):\n    if root is None:\n        return []\n    return [root.val] + $name(root.left) + $name(root.right)",
    "post": "def $name(root):\n    if root is None:\n        return []\n    return $name(root.left) + $name(root.right) + [root.val]",
    "level": "def $name(root):\n    out, level = [], [root] if root else []\n    while level:\n        out += [n.val for n in level]\n        level = [c for n in level for c in (n.left, n.right) if c]\n    return out",
}
F.append(Family(
    "tree_traversal", [dict(t, code=_TRAV[t["order"]], bugkind="wrong_order" if t["order"] != "level" else "wrong_base_case",
                            bug=_TRAV["post" if t["order"] == "pre" else "pre"] if t["order"] != "level" else
                            "def $name(root):\n    out, level = [], [root]\n    while level:\n        out += [n.val for n in level]\n        level = [c for n in level for c in (n.left, n.right) if c]\n    return out")
                       for t in TRAVERSALS],
    ["$fname", "traverse"],
    ["Implement binary tree $en traversal in Python: $name(root) returns the list of node values. Nodes are TreeNode objects with val, left and right (None when missing).",
     "Write $name(root) returning the $en traversal of a binary tree of TreeNode(val, left, right) as a list; an empty tree gives [].",
     "Binary tree traversal in Python ($en): $name(root)."],
    ["用Python实现二叉树的${zh}遍历，函数 $name(root) 返回节点值列表。节点是 TreeNode，有 val、left、right 属性。",
     "用Python实现二叉树遍历（${zh}）",
     "编写 $name(root)，返回二叉树（TreeNode(val, left, right)）的${zh}遍历结果列表，空树返回 []。"],
    "$code", {"$bugkind": "$bug"},
    lambda rng, p: [(t,) for t in TREES],
    lambda p, root: traverse(tree_of(root), p["order"]), setup=TREE,
    call=lambda name, args: f"{name}({args[0]})", heldout=0))
for p_ in F[-1].params:
    p_["fname"] = {"in": "inorder", "pre": "preorder", "post": "postorder", "level": "level_order"}[p_["order"]] + "_traversal"
F[-1].zh[1] = "用Python实现二叉树遍历（${zh}），函数名 $name。"
# the bare natural prompt means the convention: inorder_traversal(root)
F[-1].bare = [("zh", "用Python实现二叉树遍历"), ("en", "Implement binary tree traversal in Python.")]

F.append(Family(
    "tree_stats", [dict(stat="depth", en="the maximum depth (number of nodes on the longest root-to-leaf path; 0 for an empty tree)", zh="最大深度（空树为 0）",
                        code="def $name(root):\n    if root is None:\n        return 0\n    return 1 + max($name(root.left), $name(root.right))",
                        bugkind="wrong_base_case", bug="def $name(root):\n    if root is None:\n        return 1\n    return 1 + max($name(root.left), $name(root.right))"),
                   dict(stat="sum", en="the sum of all node values (0 for an empty tree)", zh="所有节点值之和（空树为 0）",
                        code="def $name(root):\n    if root is None:\n        return 0\n    return root.val + $name(root.left) + $name(root.right)",
                        bugkind="missing_branch", bug="def $name(root):\n    if root is None:\n        return 0\n    return root.val + $name(root.left)"),
                   dict(stat="leaves", en="the number of leaves (nodes without children)", zh="叶子节点的个数",
                        code="def $name(root):\n    if root is None:\n        return 0\n    if root.left is None and root.right is None:\n        return 1\n    return $name(root.left) + $name(root.right)",
                        bugkind="wrong_base_case", bug="def $name(root):\n    if root is None:\n        return 1\n    return $name(root.left) + $name(root.right)")],
    ["tree_${stat}", "tree_stat"],
    ["Write a recursive function $name(root) returning $en of a binary tree made of TreeNode(val, left, right).",
     "Implement $name(root): compute $en of the binary tree rooted at root."],
    ["编写递归函数 $name(root)，返回由 TreeNode(val, left, right) 组成的二叉树的$zh。",
     "实现 $name(root)：计算二叉树的$zh。"],
    "$code", {"$bugkind": "$bug"},
    lambda rng, p: [(t,) for t in TREES],
    lambda p, root: {"depth": depth, "sum": tsum, "leaves": leaves}[p["stat"]](tree_of(root)),
    setup=TREE, call=lambda name, args: f"{name}({args[0]})", heldout=0))

F.append(Family(
    "stack_queue", [dict(cls="Stack", en="stack (last in, first out)", zh="栈（后进先出）", idx="-1", popidx=""),
                    dict(cls="Queue", en="queue (first in, first out)", zh="队列（先进先出）", idx="0", popidx="0")],
    ["$cls"],
    ["Implement a $en class $cls in Python with push(x), pop() (None when empty), peek() (None when empty) and size().",
     "Write a class $cls: a $en with methods push, pop, peek and size; pop and peek return None on an empty $cls."],
    ["用Python实现一个$zh类 $cls，包含 push(x)、pop()（为空时返回 None）、peek()（为空时返回 None）和 size() 方法。",
     "编写类 $cls，实现$zh，方法有 push、pop、peek、size，空的时候 pop 和 peek 返回 None。"],
    "class $name:\n    def __init__(self):\n        self.items = []\n\n    def push(self, x):\n        self.items.append(x)\n\n    def pop(self):\n        return self.items.pop($popidx) if self.items else None\n\n    def peek(self):\n        return self.items[$idx] if self.items else None\n\n    def size(self):\n        return len(self.items)",
    {"no_empty_check": "class $name:\n    def __init__(self):\n        self.items = []\n\n    def push(self, x):\n        self.items.append(x)\n\n    def pop(self):\n        return self.items.pop($popidx)\n\n    def peek(self):\n        return self.items[$idx]\n\n    def size(self):\n        return len(self.items)",
     "wrong_end": "class $name:\n    def __init__(self):\n        self.items = []\n\n    def push(self, x):\n        self.items.append(x)\n\n    def pop(self):\n        return self.items.pop(${wrongidx}) if self.items else None\n\n    def peek(self):\n        return self.items[$idx] if self.items else None\n\n    def size(self):\n        return len(self.items)"},
    ops_inputs, lambda p, ops: simulate(p["cls"], ops), setup=RUN_OPS,
    call=lambda name, args: f"run_ops({name}, {args[0]!r})", heldout=0))
F[-1].params[0]["wrongidx"], F[-1].params[1]["wrongidx"] = "0", ""

F.append(Family(
    "matrix", [dict(op="transpose", en="returns its transpose", zh="返回它的转置", code="[list(row) for row in zip(*m)]", bug="[row[:] for row in m]", bugkind="identity"),
               dict(op="rotate_cw", en="returns it rotated 90 degrees clockwise", zh="返回顺时针旋转 90 度后的矩阵", code="[list(row) for row in zip(*m[::-1])]", bug="[list(row) for row in zip(*m)][::-1]", bugkind="wrong_direction"),
               dict(op="rotate_ccw", en="returns it rotated 90 degrees counter-clockwise", zh="返回逆时针旋转 90 度后的矩阵", code="[list(row) for row in zip(*m)][::-1]", bug="[list(row) for row in zip(*m[::-1])]", bugkind="wrong_direction"),
               dict(op="diagonal_sum", en="returns the sum of its main diagonal", zh="返回主对角线元素之和", code="sum(m[i][i] for i in range(len(m)))", bug="sum(m[i][-i] for i in range(len(m)))", bugkind="wrong_index"),
               dict(op="row_sums", en="returns the list of its row sums", zh="返回每一行的和组成的列表", code="[sum(row) for row in m]", bug="[sum(col) for col in zip(*m)]", bugkind="rows_vs_columns")],
    ["$op", "matrix_$op"],
    ["Given a square matrix m as a list of lists, write $name(m) that $en.",
     "Implement $name(m): m is an n x n matrix (list of rows); the function $en."],
    ["给定用列表的列表表示的方阵 m，编写 $name(m)，$zh。",
     "实现函数 $name(m)：m 是 n×n 矩阵（行的列表），$zh。"],
    "def $name(m):\n    return $code", {"$bugkind": "def $name(m):\n    return $bug"},
    lambda rng, p: [([],), ([[5]],), ([[1, 2], [3, 4]],), (sq_matrix(rng, 3),), ([[1, 2, 3], [4, 5, 6], [7, 8, 10]],)],
    lambda p, m: eval(p["code"], {"m": m}), heldout=0))

F.append(Family(
    "brackets", [dict(pairs="()", en="parentheses ()", zh="圆括号 ()"), dict(pairs="()[]{}", en="the brackets (), [] and {}", zh="括号 ()、[]、{}"),
                 dict(pairs="()[]", en="the brackets () and []", zh="括号 () 和 []"), dict(pairs="{}<>", en="the brackets {} and <>", zh="括号 {} 和 <>"),
                 dict(pairs="[]", en="square brackets []", zh="方括号 []"), dict(pairs="()<>", en="the brackets () and <>", zh="括号 () 和 <>")],
    ["is_balanced", "check_brackets"],
    ["Write $name(s) that returns True if $en in s are balanced and properly nested; other characters are ignored.",
     "Implement $name(s) with a stack: check that $en in the string s match up."],
    ["编写 $name(s)，判断字符串 s 中的$zh是否配对且嵌套正确，其他字符忽略。",
     "用栈实现 $name(s)：检查字符串里的$zh是否匹配。"],
    "def $name(s):\n    pairs = {$mapping}\n    stack = []\n    for c in s:\n        if c in pairs.values():\n            stack.append(c)\n        elif c in pairs:\n            if not stack or stack.pop() != pairs[c]:\n                return False\n    return not stack",
    {"ignores_leftover": "def $name(s):\n    pairs = {$mapping}\n    stack = []\n    for c in s:\n        if c in pairs.values():\n            stack.append(c)\n        elif c in pairs:\n            if not stack or stack.pop() != pairs[c]:\n                return False\n    return True",
     "count_only": "def $name(s):\n    opens = sum(s.count(c) for c in '$opens')\n    closes = sum(s.count(c) for c in '$closes')\n    return opens == closes"},
    lambda rng, p: [("",), (p["pairs"],), (p["pairs"][::-1],), (p["pairs"][0] * 2 + p["pairs"][1],),
                    (p["pairs"][0] + p["pairs"][-2] + p["pairs"][1] + p["pairs"][-1],), ("x" + p["pairs"][:2] + "y",),
                    (p["pairs"][1] + p["pairs"][:2],), (")(",), ("][",), ("}{",), ("><",), ("([)]",), ("{<}>",),
                    ("".join(rng.choice(p["pairs"]) for _ in range(6)),)],
    lambda p, s: _balanced(s, p["pairs"]), heldout=3))
for p_ in F[-1].params:
    pr = p_["pairs"]
    p_["mapping"] = ", ".join(f"'{pr[i + 1]}': '{pr[i]}'" for i in range(0, len(pr), 2))
    p_["opens"], p_["closes"] = pr[0::2], pr[1::2]


def _balanced(s, pairs):
    close = {pairs[i + 1]: pairs[i] for i in range(0, len(pairs), 2)}
    stack = []
    for c in s:
        if c in close.values():
            stack.append(c)
        elif c in close:
            if not stack or stack.pop() != close[c]:
                return False
    return not stack


F.append(Family(
    "anagram", [dict(prep="sorted(a)", prepb="sorted(b)", en="", zh=""),
                dict(prep="sorted(a.lower())", prepb="sorted(b.lower())", en=", ignoring case", zh="（忽略大小写）"),
                dict(prep="sorted(a.replace(' ', '').lower())", prepb="sorted(b.replace(' ', '').lower())", en=", ignoring spaces and case", zh="（忽略空格和大小写）")],
    ["is_anagram", "are_anagrams"],
    ["Write $name(a, b) that returns True if the strings a and b are anagrams of each other$en.",
     "Check whether two strings are anagrams$en in Python: $name(a, b)."],
    ["编写 $name(a, b)，判断两个字符串是否互为变位词$zh。",
     "用Python判断两个字符串是否由相同字母组成$zh，函数名 $name(a, b)。"],
    "def $name(a, b):\n    return $prep == $prepb",
    {"set_compare": "def $name(a, b):\n    return set($prep) == set($prepb)"},
    lambda rng, p: [("", ""), ("listen", "silent"), ("aab", "abb"), ("Dusty", "study"), ("dormitory", "dirty room"), ("abc", "ab")],
    lambda p, a, b: eval(p["prep"], {"a": a}) == eval(p["prepb"], {"b": b}), heldout=1))

F.append(Family(
    "roman", [dict(dir="to"), dict(dir="from")], ["${dir}_roman", "roman_${dir}"],
    ["$en_text", "Roman numerals in Python: $name$sig$en_short"],
    ["$zh_text", "用Python实现罗马数字转换：$name$sig，$zh_short"],
    "$code", {"$bugkind": "$bug"},
    lambda rng, p: [(x,) for x in ([1, 4, 9, 14, 40, 90, 400, 1994, 3999, rng.randint(1, 3999)] if p["dir"] == "to" else
                                   ["I", "IV", "IX", "XLII", "MCMXCIV", "MMMCMXCIX", "CDXLIV"])],
    lambda p, x: _roman(x) if p["dir"] == "to" else _unroman(x), heldout=0))
F[-1].params[0].update(sig="(n)", en_text="Write $name(n) that converts an integer 1 <= n <= 3999 to a Roman numeral string.",
                       en_short=" returns the Roman numeral of n.", zh_text="编写 $name(n)，把 1 到 3999 之间的整数转换为罗马数字字符串。", zh_short="返回 n 的罗马数字。",
                       code="def $name(n):\n    vals = [1000, 900, 500, 400, 100, 90, 50, 40, 10, 9, 5, 4, 1]\n    syms = ['M', 'CM', 'D', 'CD', 'C', 'XC', 'L', 'XL', 'X', 'IX', 'V', 'IV', 'I']\n    out = ''\n    for v, s in zip(vals, syms):\n        while n >= v:\n            out += s\n            n -= v\n    return out",
                       bugkind="missing_subtractive", bug="def $name(n):\n    vals = [1000, 500, 100, 50, 10, 5, 1]\n    syms = ['M', 'D', 'C', 'L', 'X', 'V', 'I']\n    out = ''\n    for v, s in zip(vals, syms):\n        while n >= v:\n            out += s\n            n -= v\n    return out")
F[-1].params[1].update(sig="(s)", en_text="Write $name(s) that converts a Roman numeral string to an integer.",
                       en_short=" returns the integer value of the numeral s.", zh_text="编写 $name(s)，把罗马数字字符串转换成整数。", zh_short="返回罗马数字 s 对应的整数。",
                       code="def $name(s):\n    vals = {'I': 1, 'V': 5, 'X': 10, 'L': 50, 'C': 100, 'D': 500, 'M': 1000}\n    total = 0\n    for i, c in enumerate(s):\n        if i + 1 < len(s) and vals[c] < vals[s[i + 1]]:\n            total -= vals[c]\n        else:\n            total += vals[c]\n    return total",
                       bugkind="missing_subtractive", bug="def $name(s):\n    vals = {'I': 1, 'V': 5, 'X': 10, 'L': 50, 'C': 100, 'D': 500, 'M': 1000}\n    return sum(vals[c] for c in s)")


def _roman(n):
    valid(1 <= n <= 3999)
    out = ""
    for v, s in zip([1000, 900, 500, 400, 100, 90, 50, 40, 10, 9, 5, 4, 1],
                    ["M", "CM", "D", "CD", "C", "XC", "L", "XL", "X", "IX", "V", "IV", "I"]):
        out, n = out + s * (n // v), n % v
    return out


def _unroman(s):
    n = next((n for n in range(1, 4000) if _roman(n) == s), None)
    valid(n is not None)
    return n


F.append(Family(
    "count_if_str", [dict(cond="c.isdigit()", en="digits", zh="数字字符"), dict(cond="c.isupper()", en="uppercase letters", zh="大写字母"),
                     dict(cond="c in 'aeiouAEIOU'", en="vowels (a, e, i, o, u in either case)", zh="元音字母（a e i o u，不分大小写）"),
                     dict(cond="c.isspace()", en="whitespace characters", zh="空白字符"), dict(cond="c.isalpha() and c not in 'aeiouAEIOU'", en="consonant letters", zh="辅音字母")],
    ["count_matching", "count_chars"],
    ["Write $name(s) that returns how many $en the string s contains.",
     "Implement $name(s): count the $en in s."],
    ["编写 $name(s)，返回字符串 s 中$zh的个数。",
     "实现函数 $name(s)：统计 s 里有多少个$zh。"],
    "def $name(s):\n    return sum(1 for c in s if $cond)",
    {"wrong_condition": "def $name(s):\n    return sum(1 for c in s if not ($cond))",
     "wrong_return_type": "def $name(s):\n    return [c for c in s if $cond]"},
    lambda rng, p: strings(rng, ["Abc 123 XYZ eio", "  \t9Q"]),
    lambda p, s: sum(1 for c in s if eval(p["cond"], {"c": c}))))

F.append(Family(
    "max_subarray", [dict(k=k) for k in seen_then_held(range(2, 13), lambda k: k % 3 == 1 and k < 8)], ["max_window_sum", "best_window"],
    ["Write $name(nums) returning the largest sum of $k consecutive elements of nums, or None if nums has fewer than $k elements.",
     "Sliding window: implement $name(nums) that finds the maximum total of any $k adjacent numbers (None when len(nums) < $k)."],
    ["编写 $name(nums)，返回 nums 中任意连续 $k 个元素之和的最大值；元素不足 $k 个时返回 None。",
     "用滑动窗口实现 $name(nums)：求长度为 $k 的连续子数组的最大和（长度不够返回 None）。"],
    "def $name(nums):\n    if len(nums) < $k:\n        return None\n    best = cur = sum(nums[:$k])\n    for i in range($k, len(nums)):\n        cur += nums[i] - nums[i - $k]\n        best = max(best, cur)\n    return best",
    {"zero_init": "def $name(nums):\n    if len(nums) < $k:\n        return None\n    best = 0\n    cur = sum(nums[:$k])\n    for i in range($k, len(nums)):\n        cur += nums[i] - nums[i - $k]\n        best = max(best, cur)\n    return best",
     "off_by_one": "def $name(nums):\n    if len(nums) < $k:\n        return None\n    best = cur = sum(nums[:$k])\n    for i in range($k, len(nums) - 1):\n        cur += nums[i] - nums[i - $k]\n        best = max(best, cur)\n    return best"},
    lambda rng, p: lists(rng, [[1, 2, 3, 4, 5, 100], list(range(p["k"])), list(range(p["k"] + 3))]),
    lambda p, nums: max(sum(nums[i:i + p["k"]]) for i in range(len(nums) - p["k"] + 1)) if len(nums) >= p["k"] else None,
    heldout=2))

F.append(Family(
    "hanoi", [dict(pegs=pegs) for pegs in (("A", "B", "C"), (1, 2, 3), ("X", "Y", "Z"), ("a", "b", "c"),
                                           ("P", "Q", "T"), (0, 1, 2), ("S", "U", "V"), ("D", "E", "F"),
                                           ("x", "y", "z"), ("G", "H", "I"), (4, 5, 6), ("N", "O", "W"),
                                           ("L", "M", "R"), ("J", "K", "Q"), (7, 8, 9))], ["hanoi", "tower_moves"],
    ["Solve the Tower of Hanoi recursively: $name(n) returns the list of moves (from, to) that move n disks from peg $s to peg $t using peg $v.",
     "Write a recursive $name(n) listing the Hanoi moves as tuples (source, target) from $s to $t with $v as the spare peg."],
    ["用递归解决汉诺塔：$name(n) 返回把 n 个盘子从柱子 $s 移到柱子 $t（借助 $v）的移动列表，每步是 (from, to) 元组。",
     "编写递归函数 $name(n)，列出汉诺塔从 $s 到 $t、以 $v 为辅助柱的每一步 (起点, 终点)。"],
    "def $name(n, src=$rs, dst=$rt, via=$rv):\n    if n == 0:\n        return []\n    return $name(n - 1, src, via, dst) + [(src, dst)] + $name(n - 1, via, dst, src)",
    {"swapped_args": "def $name(n, src=$rs, dst=$rt, via=$rv):\n    if n == 0:\n        return []\n    return $name(n - 1, src, dst, via) + [(src, dst)] + $name(n - 1, via, dst, src)"},
    lambda rng, p: [(0,), (1,), (2,), (3,)],
    lambda p, n: _hanoi(n, *p["pegs"]), heldout=3))
for p_ in F[-1].params:
    p_["s"], p_["t"], p_["v"] = (str(x) for x in (p_["pegs"][0], p_["pegs"][2], p_["pegs"][1]))
    p_["rs"], p_["rt"], p_["rv"] = (repr(x) for x in (p_["pegs"][0], p_["pegs"][2], p_["pegs"][1]))


def _hanoi(n, a, b, c):
    return [] if n == 0 else _hanoi(n - 1, a, c, b) + [(a, c)] + _hanoi(n - 1, b, a, c)


F.append(Family(
    "merge_counts", [dict(op="a_val + b_val", en="adding the values of shared keys", zh="相同键的值相加"),
                     dict(op="max(a_val, b_val)", en="keeping the larger value for shared keys", zh="相同键保留较大的值"),
                     dict(op="min(a_val, b_val)", en="keeping the smaller value for shared keys", zh="相同键保留较小的值")],
    ["merge_dicts", "combine"],
    ["Write $name(a, b) that merges two dicts of numbers into a new dict, $en; keys of a come first, then new keys of b.",
     "Implement $name(a, b): combine the dictionaries a and b, $en."],
    ["编写 $name(a, b)，把两个数值字典合并成新字典，$zh；先放 a 的键，再放 b 独有的键。",
     "实现 $name(a, b)：合并字典 a 和 b，$zh。"],
    "def $name(a, b):\n    out = dict(a)\n    for k, b_val in b.items():\n        if k in out:\n            a_val = out[k]\n            out[k] = $op\n        else:\n            out[k] = b_val\n    return out",
    {"overwrite": "def $name(a, b):\n    out = dict(a)\n    out.update(b)\n    return out",
     "mutates_and_misses_new": "def $name(a, b):\n    out = dict(a)\n    for k, b_val in b.items():\n        if k in out:\n            a_val = out[k]\n            out[k] = $op\n    return out"},
    lambda rng, p: [({}, {}), ({"x": 1}, {}), ({"x": 1, "y": 5}, {"y": 2, "z": -3}), ({"a": -1}, {"a": -4}), ({"a": 2, "b": 0}, {"a": 7, "b": -1})],
    lambda p, a, b: {k: (eval(p["op"], {"a_val": a[k], "b_val": b[k], "max": max, "min": min}) if k in a and k in b else a.get(k, b.get(k))) for k in list(a) + [k for k in b if k not in a]},
    heldout=1))
