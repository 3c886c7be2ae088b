import time, torch
from examples._support import assets, tasks
from lightning_latency.distillation import student_from_pruned_teacher
torch.set_num_threads(2)
teacher, tok = assets.load_smollm2()
train, test = tasks.bbc_lm_splits(tok, seq_len=128, n_train=64, n_test=32)
cal=[{"input_ids": torch.stack([train[i+j]["input_ids"] for j in range(4)]), "labels": torch.stack([train[i+j]["input_ids"] for j in range(4)])} for i in range(0,16,4)]
print("teacher", tasks.perplexity(teacher, test), flush=True)
for k in (3,4,5):
    s = student_from_pruned_teacher(teacher, 0.0, layers_removed=k, calibration=cal)
    print("depth", k, tasks.perplexity(s, test), flush=True)
for imp in ():
    s = student_from_pruned_teacher(teacher, 0.1, importance=imp, calibration=cal)
    print("width0.1", imp, tasks.perplexity(s, test), flush=True)
