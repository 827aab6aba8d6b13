fn main() {
    autopipe_torch_link::link_cuda_if_present();
}
