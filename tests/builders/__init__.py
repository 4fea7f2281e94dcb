"""Files the tests build: Caffe's weights and means (caffe_files), image trees with awkward and
unreadable images (image_trees), and ImageNet's three archives and Kaggle's copy (imagenet_archives)."""
